"""MetaSchedule tuning with a persistent per-target database: only workloads missing from it are tuned."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

from slimc.cache import cache_dir
from slimc.errors import SlimcError

DB_FORMAT = 1
ATTEMPTED = "slimc-attempted.json"


class TuningError(SlimcError):
    """Tuning could not run (bad database dir, no tasks, MetaSchedule failure)."""


def db_dir_for(target) -> str:
    """The default database directory of a target: keyed by triple, CPU, features and TVM version."""
    import tvm

    key = "-".join([target.triple, target.mcpu] + [a.strip("+") for a in target.mattr if a.startswith("+")])
    return cache_dir("tune", f"{key}-tvm{tvm.__version__}")


@dataclass
class TuneSummary:
    """What a tuning call did: tasks found/tuned/reused, trials, seconds, database path."""

    database: str
    tasks_total: int = 0
    tasks_tuned: int = 0
    tasks_reused: int = 0
    trials: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    set_aside: str | None = None
    tuned_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _meta(target) -> dict:
    import tvm

    return {"format": DB_FORMAT, "tvm": tvm.__version__, "target": target.tvm_dict()}


def open_database(path: str, target, summary: TuneSummary, log=print):
    """Open (or create) the JSON database at `path`; a corrupt or mismatched one is set aside and rebuilt."""
    from tvm.s_tir import meta_schedule as ms

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise TuningError(f"cannot create tuning database dir {path}: {e.strerror}. Pass a writable --tune-db.") from None
    meta_path = os.path.join(path, "slimc-db.json")
    problem = None
    has_records = any(os.path.exists(os.path.join(path, f))
                      for f in ("database_workload.json", "database_tuning_record.json"))
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("format") != DB_FORMAT or meta.get("tvm") != _meta(target)["tvm"]:
                problem = f"it was written by another slimc/TVM version ({meta.get('tvm')})"
            elif meta.get("target") != target.tvm_dict():
                problem = f"it belongs to another target ({meta.get('target')})"
        except (OSError, ValueError) as e:
            problem = f"its metadata is unreadable ({e})"
    elif has_records:
        problem = "it has no slimc metadata"
    db = None
    if problem is None:
        try:
            db = ms.database.JSONDatabase(work_dir=path)
            db.get_all_tuning_records()
        except Exception as e:  # MetaSchedule raises plain errors for malformed JSON lines
            problem = f"it does not parse ({str(e).splitlines()[0][:200]})"
    if problem is not None:
        aside = f"{path.rstrip(os.sep)}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(path, aside)
        os.makedirs(path)
        summary.set_aside = aside
        log(f"warning: tuning database {path} was set aside to {aside} because {problem}; rebuilding it")
        db = ms.database.JSONDatabase(work_dir=path)
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_meta(target), f, indent=2)
    os.replace(tmp, meta_path)
    return db


def vectorizable_rounding() -> None:
    """Let TIR's vectorizer emit vector `nearbyint` (LLVM: vrndscaleps / frintx) instead of scalarizing the loop.

    TVM 0.27 marks `round`, `floor`, `exp`... as vectorizable but not `nearbyint`, which `R.round` legalizes
    to: every requantizing epilogue was compiled lane by lane (measured: a 32->16 1x1 int8 conv at 112x112,
    0.169 ms scalar, 0.031 ms vector). Idempotent; process-wide like TVM's own op attributes.
    """
    import tvm

    op = tvm.ir.Op.get("tirx.nearbyint")
    if not op.get_attr("TVectorizable"):
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def prepare(mod, tvm_target):
    """Legalize and fuse a lowered module (the form whose PrimFuncs are tuned and built).

    These are TVM's "zero" pipeline's passes (without its database step: tuning applies its own), with the kernel
    map (slimc.targets.kernel_map) noted across the fusion.
    """
    import tvm
    from tvm import relax

    from slimc.targets import kernel_map

    t = relax.transform
    vectorizable_rounding()
    with tvm_target:
        return tvm.transform.Sequential([t.DecomposeOpsForInference(), t.CanonicalizeBindings(), t.LegalizeOps(),
                                         t.AnnotateTIROpPattern(), t.FoldConstant(),
                                         kernel_map.note_bindings(), t.FuseOps(),
                                         kernel_map.note_fused_nodes(), t.FuseTIR(),
                                         kernel_map.name_kernels()])(mod)


def _has_record(db, task, tvm_target) -> bool:
    return db.query_tuning_record(task.dispatched[0], tvm_target, task.task_name) is not None


def _is_scheduled(task) -> bool:
    """Tasks already scheduled by a template (targets/schedules.py) need no tuning."""
    return any(f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))
               for f in task.dispatched[0].functions.values())


def _task_key(task) -> str:
    import tvm_ffi

    return f"{task.task_name}:{tvm_ffi.structural_hash(task.dispatched[0])}"


def _attempted(path: str) -> set[str]:
    """Workloads tuned before (even those where no candidate built): never re-tuned automatically."""
    try:
        with open(os.path.join(path, ATTEMPTED)) as f:
            return set(json.load(f))
    except (OSError, ValueError):
        return set()


def _record_attempted(path: str, keys: set[str]) -> None:
    tmp = os.path.join(path, ATTEMPTED + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sorted(keys), f, indent=0)
    os.replace(tmp, os.path.join(path, ATTEMPTED))


class _Progress:
    """Per-task progress with ETA on stderr (MetaSchedule reports each batch of measured candidates)."""

    def __init__(self, names: list[str], per_task: int, stream=sys.stderr) -> None:
        self.names, self.per_task, self.stream = names, per_task, stream
        self.done = [0] * len(names)
        self.best = [math.inf] * len(names)
        self.t0 = time.perf_counter()
        self.task_t0: dict[int, float] = {}

    def update(self, task_id: int, n: int, seconds: list[float]) -> None:
        self.task_t0.setdefault(task_id, time.perf_counter())
        self.done[task_id] += n
        if seconds:
            self.best[task_id] = min(self.best[task_id], min(seconds))
        total_done = sum(self.done)
        total = self.per_task * len(self.names)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(total_done, 1) * max(total - total_done, 0)
        task_elapsed = time.perf_counter() - self.task_t0[task_id]
        task_eta = task_elapsed / max(self.done[task_id], 1) * max(self.per_task - self.done[task_id], 0)
        best = f"{self.best[task_id] * 1e3:.3f} ms" if self.best[task_id] < math.inf else "-"
        width = 24
        filled = int(width * min(total_done, total) / max(total, 1))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {total_done}/{total} trials | task "
                          f"{task_id + 1}/{len(self.names)} {self.names[task_id][:32]} {self.done[task_id]}/"
                          f"{self.per_task} best {best} eta {task_eta:.0f}s | total eta {eta:.0f}s   ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _progress_callback(progress: _Progress):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class Report(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            secs = []
            for r in runner_results:
                if r.run_secs:
                    secs.append(sum(float(s) for s in r.run_secs) / len(r.run_secs))
            progress.update(int(task_id), len(measure_candidates), secs)

    return Report()


def tune(mod, target, db_path: str | None = None, trials: int = 0, tune_ops: list[str] | None = None,
         log=print, show_progress: bool = True):
    """Tune the prepared module's missing workloads into the database; returns (database, TuneSummary)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts

    tvm_target = target.tvm()
    path = os.path.abspath(db_path or db_dir_for(target))
    summary = TuneSummary(database=path)
    db = open_database(path, target, summary, log)
    tasks = [t for t in extract_tasks(mod, tvm_target) if not _is_scheduled(t)]
    summary.tasks_total = len(tasks)
    attempted = _attempted(path)
    known = [t for t in tasks if _has_record(db, t, tvm_target) or _task_key(t) in attempted]
    summary.tasks_reused = len(known)
    missing = [t for t in tasks if not any(t is k for k in known)]
    if tune_ops:
        missing = [t for t in missing if any(op in t.task_name for op in tune_ops)]
    if trials <= 0 or not missing:
        return db, summary
    per_task = max(1, math.ceil(trials / len(missing)))
    log(f"tuning {len(missing)} of {len(tasks)} workloads ({summary.tasks_reused} reused from {path}), "
        f"{per_task} trials each")
    work_dir = os.path.join(path, "logs")
    # MetaSchedule sizes its console handler from this level (and resets it to DEBUG when it configures its
    # loggers), so set it before every call: per-task tables go to its log files, not the console.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctxs, weights = extracted_tasks_to_tune_contexts(missing, work_dir)
    progress = _Progress([t.task_name for t in missing], per_task) if show_progress else None
    callbacks = ms.MeasureCallback.create("default")
    if progress is not None:
        callbacks = list(callbacks) + [_progress_callback(progress)]
    t0 = time.perf_counter()
    try:
        ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=work_dir, max_trials_global=per_task * len(missing),
                      max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), database=db,
                      measure_callbacks=callbacks, builder=ms.builder.LocalBuilder(timeout_sec=120))
    except KeyboardInterrupt:
        summary.interrupted = True
        log("interrupted: the records tuned so far are kept in the database")
    else:
        _record_attempted(path, attempted | {_task_key(t) for t in missing})
    finally:
        if progress is not None:
            progress.close()
        summary.seconds = time.perf_counter() - t0
    summary.tasks_tuned = len(missing)
    summary.trials = per_task * len(missing)
    summary.tuned_names = [t.task_name for t in missing]
    if summary.interrupted:
        raise KeyboardInterrupt
    return db, summary


def apply_database(mod, target, db):
    """Replace PrimFuncs with their best tuned schedules from the database."""
    from tvm import relax

    with target.tvm(), db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
