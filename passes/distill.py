"""Pruning recovery: re-estimate batch-norm statistics on data, then distill from the unpruned model (the teacher).

Both passes read `PassContext.training_data` (`--train`, else `--data`). `bn-reestimate` runs in one pass over the
data: every batch_norm normalizes with the statistics accumulated so far (this batch included) and the final figures
are the population mean/variance of its input, so the estimate does not depend on the stale statistics that pruning
left behind.
`distill` trains the graph's parameters through the differentiable interpreter against `PassContext.reference`
(the graph the pipeline started from) with temperature-scaled KL on the outputs, optional cross-entropy to the
labels and optional feature matching; batch-norm statistics stay frozen there, so re-estimate them first.

On a QDQ graph (after `quantize`) `distill` is quantization-aware training: the interpreter's fake-quant mode runs
every quantize as in the int8 model with a straight-through gradient, trains float master copies of the int8
weights (put back on their fixed per-channel grids at the end, and in each checkpoint) and the biases; the
calibrated activation grids stay as they are, so `fold-qdq` and every later pass see an ordinary QDQ graph.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimc import ir
from slimc.data import Batch, iter_batches
from slimc.errors import PipelineError
from slimc.interpreter import GraphModule, run_node
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.quant.fold import INTEGER_OPS


def require_data(ctx: PassContext, pass_name: str) -> Any:
    """The training pass's dataset (--train, else --data), or a PipelineError saying how to give one."""
    ds = ctx.training_data
    if ds is None:
        raise PipelineError(f"{pass_name} needs data to run the model on: pass --train or --data SPEC to slimc "
                            "inspect/compile (a folder of images such as photos/:resize=256,crop=224, an .npy/.npz "
                            "file, or package.module:callable; see README 'Pruning and recovery'), or set "
                            "PassContext.train or .data")
    if len(ds) == 0:
        raise PipelineError(f"{pass_name}: the data ({getattr(ds, 'name', 'dataset')}) has no samples")
    return ds


def to_tensors(graph: Graph, batch: Batch) -> list[torch.Tensor]:
    """A batch's arrays as torch tensors of the graph's input dtypes."""
    return [torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, t.dtype))
            for a, (_, t) in zip(batch.inputs, graph.inputs)]


def _last_uses(graph: Graph) -> list[list[str]]:
    """Per node, the values (not outputs or parameters) read for the last time there: freed to bound memory."""
    keep = set(graph.outputs) | set(graph.param_types)
    last = {v: i for i, n in enumerate(graph.nodes) for v in n.inputs}
    out: list[list[str]] = [[] for _ in graph.nodes]
    for v, i in last.items():
        if v not in keep:
            out[i].append(v)
    return out


# ---- bn-reestimate ---------------------------------------------------------------------------------

class _Moments:
    """Streaming per-channel mean and (population) variance, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        x = x.detach().to(torch.float64)
        n = x.numel() // x.shape[1]
        bm = x.mean(dims)
        bm2 = ((x - bm.reshape(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, bm, bm2
            return
        total = self.count + n
        delta = bm - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + bm2 + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count


def _bn_targets(graph: Graph) -> tuple[list[Node], list[str]]:
    """batch_norm nodes whose mean/var are parameters read by that node alone; reasons for the others."""
    ok, skipped = [], []
    for n in graph.nodes:
        if n.op != "batch_norm":
            continue
        stats = n.inputs[3:5]
        if not all(graph.is_param(v) and v in graph.weights for v in stats):
            skipped.append(f"{n.name}: statistics are not stored parameters")
        elif any(len(graph.users(v)) > 1 for v in stats):
            skipped.append(f"{n.name}: statistics shared with other nodes")
        else:
            ok.append(n)
    return ok, skipped


def estimate_bn_statistics(graph: Graph, batches: Iterable[Batch], nodes: Sequence[Node]) -> tuple[dict[str, _Moments], int]:
    """Per batch_norm node, the moments of its input with every batch_norm normalizing by the running estimate."""
    module = GraphModule(graph)
    params = module.named_graph_parameters()
    moments = {n.name: _Moments() for n in nodes}
    last = _last_uses(graph)
    samples = 0
    with torch.no_grad():
        for batch in batches:
            env: dict[str, torch.Tensor] = dict(params)
            env.update(zip(graph.input_names, to_tensors(graph, batch)))
            for i, node in enumerate(graph.nodes):
                args = [env[v] for v in node.inputs]
                m = moments.get(node.name)
                if m is not None:
                    m.add(args[0])
                    x = args[0]
                    outs: tuple[torch.Tensor, ...] = (F.batch_norm(
                        x, m.mean.to(x.dtype), m.var.to(x.dtype), args[1], args[2], False, 0.0, node.attrs["eps"]),)
                else:
                    outs = run_node(node, args)
                env.update(zip(node.outputs, outs))
                for v in last[i]:
                    env.pop(v, None)
            samples += len(batch)
    return moments, samples


def _limited(it: Iterable[Batch], n: int) -> Iterable[Batch]:
    for k, b in enumerate(it):
        if n and k >= n:
            return
        yield b


@register_pass(
    "bn-reestimate",
    batches=opt(int, 0, "batches of --data to read (0: all of it)"),
    batch_size=opt(int, 64, "samples per batch"),
)
def bn_reestimate(graph: Graph, ctx: PassContext) -> PassResult:
    """Re-estimate batch-norm running mean/variance on --train/--data: pruning leaves them stale (before fold-bn)."""
    o = ctx.options
    nodes, skipped = _bn_targets(graph)
    for why in skipped:
        ctx.log(f"bn-reestimate: skipped {why}")
    if not nodes:
        note = ("the graph has no batch_norm nodes (already folded? put bn-reestimate before fold-bn)"
                if not skipped else "no batch_norm with its own stored statistics")
        ctx.log(f"bn-reestimate: nothing to do: {note}")
        return PassResult(graph, False, {"batch_norms": 0, "skipped": skipped, "note": note})
    if o["batches"] < 0 or o["batch_size"] <= 0:
        raise PipelineError(f"bn-reestimate: batches={o['batches']} must be >= 0 and batch_size={o['batch_size']} > 0")
    ds = require_data(ctx, "bn-reestimate")
    moments, samples = estimate_bn_statistics(graph, _limited(ds.batches(o["batch_size"]), o["batches"]), nodes)
    weights = dict(graph.weights)
    shift, ratio = 0.0, []
    for n in nodes:
        m = moments[n.name]
        mean_p, var_p = n.inputs[3], n.inputs[4]
        old_mean, old_var = graph.weights[mean_p].astype(np.float64), graph.weights[var_p].astype(np.float64)
        new_mean, new_var = m.mean.numpy(), m.var.numpy()
        shift = max(shift, float(np.max(np.abs(new_mean - old_mean) / np.sqrt(old_var + n.attrs["eps"]))))
        ratio.append((new_var + n.attrs["eps"]) / (old_var + n.attrs["eps"]))
        weights[mean_p] = new_mean.astype(graph.weights[mean_p].dtype)
        weights[var_p] = new_var.astype(graph.weights[var_p].dtype)
    r = np.concatenate(ratio)
    ctx.log(f"bn-reestimate: {len(nodes)} batch_norm(s) re-estimated from {samples} samples")
    stats = {"batch_norms": len(nodes), "samples": samples, "skipped": skipped,
             "max_mean_shift_sigma": round(shift, 4),  # largest |new - old mean| in units of the old std
             "var_ratio_min": round(float(r.min()), 4), "var_ratio_max": round(float(r.max()), 4)}
    return PassResult(graph.replace(weights=weights), True, stats)


# ---- distillation: loss, schedule, optimizer (shared with bench/prune.py) ---------------------------

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over axis 1, averaged over samples (and positions)."""
    if student.dim() == 1:
        return F.mse_loss(student, teacher)
    s = torch.movedim(student, 1, -1).reshape(-1, student.shape[1]) / temperature
    t = torch.movedim(teacher, 1, -1).reshape(-1, teacher.shape[1]) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], labels: torch.Tensor | None,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * KL (mean over outputs) + (1 - alpha) * cross-entropy of the first output to the labels, if any."""
    kl = sum(kl_to_teacher(s, t, temperature) for s, t in zip(student, teacher)) / len(student)
    parts = {"kl": float(kl.detach())}
    if labels is None or alpha >= 1.0:
        return kl, parts
    ce = F.cross_entropy(student[0], labels)
    parts["ce"] = float(ce.detach())
    return alpha * kl + (1.0 - alpha) * ce, parts


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(params: Iterable[torch.Tensor], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, or Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise PipelineError(f"distill: optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class DistillConfig:
    """The distill pass's options, checked."""

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.9
    features: tuple[str, ...] = ()
    feature_weight: float = 1.0
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    warmup: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v, ok in (
            ("epochs", self.epochs, self.epochs >= 1), ("lr", self.lr, self.lr > 0),
            ("batch_size", self.batch_size, self.batch_size >= 1),
            ("temperature", self.temperature, self.temperature > 0), ("alpha", self.alpha, 0 <= self.alpha <= 1),
            ("feature_weight", self.feature_weight, self.feature_weight >= 0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("warmup", self.warmup, 0 <= self.warmup < 1)) if not ok]
        if bad:
            raise PipelineError(f"distill: invalid option(s) {', '.join(bad)}: epochs and batch_size >= 1, lr and "
                                "temperature > 0, alpha in [0, 1], warmup in [0, 1), weights >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise PipelineError(f"distill: optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# ---- feature matching --------------------------------------------------------------------------------

class _Capture:
    """A GraphModule hook that keeps the named values of one forward run."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.values: dict[str, torch.Tensor] = {}

    def __call__(self, node: Node, outs: tuple[torch.Tensor, ...]) -> None:
        for o, t in zip(node.outputs, outs):
            if o in self.names:
                self.values[o] = t


def _check_features(student: Graph, teacher: Graph, names: Sequence[str]) -> None:
    for g, who in ((student, "the graph being distilled"), (teacher, "the teacher (the pipeline's input graph)")):
        produced = {o for n in g.nodes for o in n.outputs}
        missing = [v for v in names if v not in produced]
        if missing:
            sample = ", ".join(sorted(produced)[:12])
            raise PipelineError(f"distill: features={';'.join(names)} names %{missing[0]}, which {who} does not "
                                f"compute; give values computed by nodes of both graphs (e.g. {sample}, ...)")
        for v in names:
            if g.type_of(v).rank < 2:
                raise PipelineError(f"distill: feature %{v} is {g.type_of(v)}; feature matching needs channels on axis 1")
    for v in names:
        s, t = student.type_of(v), teacher.type_of(v)
        if s.rank != t.rank or any(isinstance(a, int) and isinstance(b, int) and a != b
                                   for i, (a, b) in enumerate(zip(s.shape, t.shape)) if i != 1):
            raise PipelineError(f"distill: feature %{v} is {s} in the graph but {t} in the teacher; only the channel "
                                "axis may differ (a 1x1 adapter maps it)")


def _adapter(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A [C_teacher, C_student] map over axis 1, initialized by least squares on this batch (FitNets' regressor)."""
    S = torch.movedim(s.detach(), 1, -1).reshape(-1, s.shape[1]).double()
    T = torch.movedim(t.detach(), 1, -1).reshape(-1, t.shape[1]).double()
    sol = torch.linalg.lstsq(S.T @ S + 1e-6 * torch.eye(S.shape[1], dtype=S.dtype), S.T @ T).solution
    return torch.nn.Parameter(sol.T.to(s.dtype).contiguous())


def feature_loss(s: torch.Tensor, t: torch.Tensor, adapter: torch.Tensor | None) -> torch.Tensor:
    """MSE between (adapted) student and teacher activations, relative to the teacher's mean square."""
    if adapter is not None:
        s = torch.movedim(torch.movedim(s, 1, -1) @ adapter.T, -1, 1)
    return F.mse_loss(s, t) / (t.pow(2).mean() + 1e-8)


# ---- checkpoints ---------------------------------------------------------------------------------------

def graph_digest(g: Graph) -> str:
    """Structure and weight values of a graph."""
    h = hashlib.sha256(ir.print_graph(g).encode())
    for k in sorted(g.weights):
        a = np.ascontiguousarray(g.weights[k])
        h.update(f"{k}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """`PATH` (the student graph, a .slimc file), `PATH.state.pt` (optimizer, adapters, QAT float masters),
    `PATH.json` (epoch, key)."""

    path: str
    key: str

    @property
    def meta_path(self) -> str:
        return self.path + ".json"

    @property
    def state_path(self) -> str:
        return self.path + ".state.pt"

    def load(self, graph: Graph) -> tuple[int, Graph, dict] | None:
        """(epochs done, student graph, training state) when a matching checkpoint exists; None when none does."""
        if not os.path.exists(self.meta_path):
            if os.path.exists(self.path):
                raise PipelineError(f"distill: checkpoint={self.path} exists but {self.meta_path} does not, so it is "
                                    "not a distill checkpoint; delete it or choose another checkpoint path")
            return None
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
            epoch, key = int(meta["epoch"]), meta["key"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"distill: cannot read checkpoint record {self.meta_path}: {e}; delete "
                                f"{self.path}* to start over") from None
        if key != self.key:
            raise PipelineError(f"distill: checkpoint {self.path} was written by another distillation (different "
                                "model, teacher, data or options); delete it (and its .json/.state.pt) or choose "
                                "another checkpoint path")
        for p, k in ((self.path, "graph_sha256"), (self.state_path, "state_sha256")):
            if not os.path.exists(p) or _file_digest(p) != meta.get(k):
                raise PipelineError(f"distill: checkpoint file {p} is missing or does not match {self.meta_path} (an "
                                    f"interrupted save?); delete {self.path}* to start over")
        saved = ir.load(self.path)
        # calibrated ranges do not count: new weights drop those they may have changed (a QDQ graph keeps some)
        if saved.replace(calibration={}) != graph.replace(calibration={}) \
                or set(saved.weights) != set(graph.weights):
            raise PipelineError(f"distill: checkpoint {self.path} holds a different graph structure; delete it")
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        # the input graph's weight order: the optimizer state refers to parameters by position
        return epoch, graph.replace(weights={k: saved.weights[k] for k in graph.weights}), state

    def save(self, epoch: int, student: Graph, state: dict) -> None:
        """Graph and state first, the record (with their digests) last, each written atomically."""
        d = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(d, exist_ok=True)
            ir.save(student, self.path)
            tmp = f"{self.state_path}.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, self.state_path)
            meta = {"epoch": epoch, "key": self.key, "graph_sha256": _file_digest(self.path),
                    "state_sha256": _file_digest(self.state_path)}
            tmp = f"{self.meta_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2)
            os.replace(tmp, self.meta_path)
        except OSError as e:
            raise PipelineError(f"distill: cannot write checkpoint {self.path}: {e.strerror or e}; pass a writable "
                                "checkpoint path") from None


# ---- the training loop -----------------------------------------------------------------------------------

class _Progress:
    """A status line per step on stderr when it is a terminal (rewritten in place); epoch lines go to the pass log."""

    def __init__(self, enabled: bool, log: Callable[[str], None]) -> None:
        self.log = log
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r{text} {time.perf_counter() - self.t0:.1f} s\x1b[K")
            sys.stderr.flush()

    def epoch(self, text: str) -> None:
        if self.tty:  # clear the step line: the log (stderr in the CLI) prints the epoch line once
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        self.log(f"{text} {time.perf_counter() - self.t0:.1f} s")


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _check_pair(student: Graph, teacher: Graph) -> None:
    if [t.rank for _, t in student.inputs] != [t.rank for _, t in teacher.inputs]:
        raise PipelineError("distill: the graph and the teacher (the pipeline's input) take different inputs")
    st = [student.type_of(o) for o in student.outputs]
    tt = [teacher.type_of(o) for o in teacher.outputs]
    if len(st) != len(tt) or any(a.rank != b.rank or a.shape[1:] != b.shape[1:] for a, b in zip(st, tt)):
        raise PipelineError(f"distill: the graph's outputs ({', '.join(map(str, st))}) differ from the teacher's "
                            f"({', '.join(map(str, tt))}); prune must keep the output channels (classes)")


def _run_pair(student: GraphModule, teacher: GraphModule, graph: Graph, batch: Batch, features: Sequence[str]
              ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], dict, dict]:
    """Student outputs (with gradients), teacher outputs, and both sides' captured feature values."""
    x = to_tensors(graph, batch)
    s_cap, t_cap = _Capture(features), _Capture(features)
    try:
        with torch.no_grad():
            t_out = _outputs(teacher(*x, hook=t_cap if features else None))
        s_out = _outputs(student(*x, hook=s_cap if features else None))
    except RuntimeError as e:
        raise PipelineError(f"distill: running the model on a batch of {len(batch)} failed ({e}); if the model has "
                            "a fixed batch size, import it with --dynamic-batch or set batch_size to that size") from None
    return s_out, t_out, s_cap.values, t_cap.values


def distill_graph(graph: Graph, teacher: Graph, ds: Any, cfg: DistillConfig, checkpoint: str = "",
                  progress: bool = True, log: Callable[[str], None] = lambda m: None) -> tuple[Graph, dict]:
    """Train `graph`'s parameters to match `teacher` on `ds`; returns the trained graph and per-epoch figures."""
    folded = [n.name for n in graph.nodes if n.op in INTEGER_OPS]
    if folded:
        raise PipelineError(f"distill: the graph is already folded into integer ops ({folded[0]}: "
                            f"{graph.node(folded[0]).op}), which have no gradient; fine-tune the QDQ graph instead, "
                            "by putting distill between quantize and fold-qdq")
    _check_pair(graph, teacher)
    _check_features(graph, teacher, cfg.features)
    steps_per_epoch = math.ceil(len(ds) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup * total))
    ckpt = None
    start, state, student_graph = 0, None, graph
    if checkpoint:
        key = hashlib.sha256(json.dumps({"config": cfg.to_json(), "graph": graph_digest(graph),
                                         "teacher": graph_digest(teacher), "data": ds.fingerprint()},
                                        sort_keys=True).encode()).hexdigest()
        ckpt = Checkpoint(checkpoint, key)
        loaded = ckpt.load(graph)
        if loaded is not None:
            start, student_graph, state = loaded
            log(f"distill: resuming from {checkpoint} after epoch {start}/{cfg.epochs}")
    history: list[dict] = list(state["history"]) if state else []
    stats = {"teacher": teacher.name, "samples": len(ds), "steps": total, "resumed_from_epoch": start,
             "config": cfg.to_json()}
    if start >= cfg.epochs:
        return student_graph, {**stats, "history": history}
    student = GraphModule(student_graph, trainable=True, fake_quant=is_qdq(student_graph))
    if state and state.get("masters"):  # QAT: the masters' fractions below one int8 step, which the graph rounds off
        student.load_masters(state["masters"])
    teacher_m = GraphModule(teacher).eval()
    for p in teacher_m.parameters():
        p.requires_grad_(False)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg.optimizer, cfg.lr,
                               cfg.weight_decay)
    adapters: dict[str, torch.Tensor | None] = {}
    if cfg.features:
        if state:
            adapters = {k: (None if v is None else torch.nn.Parameter(v)) for k, v in state["adapters"].items()}
        else:
            first = next(iter_batches(ds, cfg.batch_size, seed=cfg.seed))
            s_cap, t_cap = _run_pair(student, teacher_m, graph, first, cfg.features)[2:]
            adapters = {v: (_adapter(s_cap[v], t_cap[v]) if s_cap[v].shape[1] != t_cap[v].shape[1] else None)
                        for v in cfg.features}
        for a in adapters.values():
            if a is not None:
                optimizer.add_param_group({"params": [a]})
    if state:
        optimizer.load_state_dict(state["optimizer"])
    step = start * steps_per_epoch
    bar = _Progress(progress, log)
    for epoch in range(start, cfg.epochs):
        sums: dict[str, float] = {}
        seen = 0
        for batch in iter_batches(ds, cfg.batch_size, seed=cfg.seed + epoch):
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total, warm)
            s_out, t_out, s_cap, t_cap = _run_pair(student, teacher_m, graph, batch, cfg.features)
            labels = None if batch.labels is None else torch.from_numpy(batch.labels)
            loss, parts = distill_loss(s_out, t_out, labels, cfg.temperature, cfg.alpha)
            if cfg.features:
                fl = sum(feature_loss(s_cap[v], t_cap[v], adapters[v]) for v in cfg.features) / len(cfg.features)
                parts["feat"] = float(fl.detach())
                loss = loss + cfg.feature_weight * fl
            if not torch.isfinite(loss):
                raise PipelineError(f"distill: the loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                    "lower lr (or raise warmup)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n = len(batch)
            seen += n
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v * n
            bar.step(f"distill: epoch {epoch + 1}/{cfg.epochs} step {step}/{total} loss {sums['loss'] / seen:.4f}")
        means = {k: v / max(seen, 1) for k, v in sums.items()}
        lr_now = optimizer.param_groups[0]["lr"]
        history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in means.items()}, "lr": lr_now})
        detail = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
        bar.epoch(f"distill: epoch {epoch + 1}/{cfg.epochs} loss {means.get('loss', 0.0):.4f} ({detail}) "
                  f"lr {lr_now:.2e}")
        if ckpt is not None:
            ckpt.save(epoch + 1, student.to_graph(), {
                "optimizer": optimizer.state_dict(), "history": history, "masters": student.masters(),
                "adapters": {k: (None if a is None else a.detach().clone()) for k, a in adapters.items()}})
    return student.to_graph(), {**stats, "history": history}


def is_qdq(graph: Graph) -> bool:
    """Whether the graph is a QDQ (quantize-inserted) graph: distill then trains it quantization-aware."""
    return any(n.op == "quantize" for n in graph.nodes)


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip().lstrip("%") for s in text.replace(",", ";").split(";") if s.strip())


@register_pass(
    "distill",
    epochs=opt(int, 1, "passes over --data"),
    lr=opt(float, 0.01, "peak learning rate (linear warm-up, then cosine decay to 0)"),
    batch_size=opt(int, 64, "samples per step"),
    temperature=opt(float, 4.0, "softmax temperature of the KL term"),
    alpha=opt(float, 0.9, "weight of the KL term; 1-alpha weighs cross-entropy to the labels (when --data has them)"),
    features=opt(str, "", "';'-separated values whose activations are matched to the teacher's (MSE)"),
    feature_weight=opt(float, 1.0, "weight of the feature-matching term"),
    optimizer=opt(str, "sgd", "sgd (Nesterov momentum 0.9) or adam"),
    weight_decay=opt(float, 0.0, "L2 weight decay"),
    warmup=opt(float, 0.05, "fraction of the steps spent warming the learning rate up"),
    seed=opt(int, 0, "seed of the data order (epoch e reads in the order of seed+e)"),
    checkpoint=opt(str, "", "save the graph here (.slimc) after every epoch and resume from it when it matches"),
    progress=opt(bool, True, "rewrite a per-step status line on stderr when it is a terminal (epochs go to the log)"),
)
def distill(graph: Graph, ctx: PassContext) -> PassResult:
    """Knowledge distillation from the pipeline's input model (the teacher) into this graph on --data (quantization-
    aware on a QDQ graph)."""
    o: Mapping[str, Any] = ctx.options
    if ctx.reference is None:
        raise PipelineError("distill needs the unpruned model as teacher: run it in a PassManager pipeline (which "
                            "sets PassContext.reference to the pipeline's input graph) or set PassContext.reference")
    cfg = DistillConfig(epochs=o["epochs"], lr=o["lr"], batch_size=o["batch_size"], temperature=o["temperature"],
                        alpha=o["alpha"], features=_names(o["features"]), feature_weight=o["feature_weight"],
                        optimizer=o["optimizer"], weight_decay=o["weight_decay"], warmup=o["warmup"], seed=o["seed"])
    ds = require_data(ctx, "distill")
    t0 = time.perf_counter()
    out, stats = distill_graph(graph, ctx.reference, ds, cfg, o["checkpoint"], o["progress"], ctx.log)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return PassResult(out, True, stats)
