"""Named passes with typed options, text pipelines, and the instruments that make every step inspectable."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from slimc import ir
from slimc.errors import IRError, PipelineError, SlimcError
from slimc.ir import Graph
from slimc.stats import GraphStats, graph_stats

@dataclass(frozen=True)
class Option:
    """One typed pass option (int, float, str or bool) with its default and help."""

    type: type
    default: Any = None
    help: str = ""

    def parse(self, text: str, where: str) -> Any:
        try:
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            return self.type(text)
        except ValueError:
            raise PipelineError(f"{where}: {text!r} is not a valid {self.type.__name__}") from None


def opt(type_: type, default: Any = None, help: str = "") -> Option:
    return Option(type_, default, help)


@dataclass(frozen=True)
class PassInput:
    """The graph an earlier pass of the pipeline was given, with that pass's resolved options."""

    graph: Graph
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the graph: its options, sample inputs, target, data, a logger.

    `data` is a `slimc.data.Dataset` (`--data`, else `--calib`); `calib` is the `--calib` one (None without it);
    `train` is the `--train` one (None without it), which the training passes read instead of `data`.
    `reference` is the model before the pipeline (the distillation teacher); `PassManager.run` fills it.
    `inputs_of[name]` is what the latest earlier run of pass `name` in this pipeline was given (e.g. the float graph
    `quantize` turned into QDQ, which bias correction and float fallback compare with); `PassManager.run` fills it.
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    sample_inputs: Sequence[np.ndarray] | None = None
    target: Any = None
    data: Any = None
    log: Callable[[str], None] = lambda msg: None
    reference: Graph | None = None
    calib: Any = None
    inputs_of: Mapping[str, PassInput] = field(default_factory=dict)
    train: Any = None

    @property
    def calibration_data(self) -> Any:
        """What calibration reads: `--calib` if given, else `--data`."""
        return self.calib if self.calib is not None else self.data

    @property
    def training_data(self) -> Any:
        """What training passes (distill, bn-reestimate) learn from: `--train` if given, else `--data`."""
        return self.train if self.train is not None else self.data


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    changed: bool
    stats: Mapping[str, Any] = field(default_factory=dict)


PassFn = Callable[[Graph, PassContext], PassResult]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    options: Mapping[str, Option]
    doc: str


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, **options: Option | type) -> Callable[[PassFn], PassFn]:
    """Register `fn(graph, ctx) -> PassResult` under `name` with typed options (`ratio=opt(float, 0.3)`)."""

    def deco(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name} registered twice")
        opts = {k: (v if isinstance(v, Option) else Option(v)) for k, v in options.items()}
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        PASSES[name] = PassInfo(name, fn, opts, doc)
        return fn

    return deco


def load_builtin_passes() -> None:
    """Import the pass modules so that their @register_pass calls run."""
    import importlib

    for mod in ("cleanup", "fold_bn", "fuse", "prune.apply", "distill", "quant.calibrate", "quant.quantize",
                "quant.fold", "quant.equalize", "quant.bias_correct",
                "quant.fallback", "quant.round_weights"):
        importlib.import_module(f"slimc.passes.{mod}")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: a pass name and its explicitly given options."""

    name: str
    options: Mapping[str, Any]

    def __str__(self) -> str:
        info = PASSES[self.name]
        given = [f"{k}={_fmt(self.options[k])}" for k in info.options if k in self.options]
        return self.name + ("{" + ",".join(given) + "}" if given else "")

    def resolved_options(self) -> dict[str, Any]:
        info = PASSES[self.name]
        return {k: self.options.get(k, o.default) for k, o in info.options.items()}


def _fmt(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


_ITEM_RE = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*")


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse `"canonicalize,fold-bn,prune{ratio=0.3,criterion=l1}"`, validating names and option types."""
    load_builtin_passes()
    specs: list[PassSpec] = []
    pos = 0
    text = text.strip()
    if not text:
        return specs
    while pos < len(text):
        m = _ITEM_RE.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline {text!r} at {text[pos:]!r}; expected "
                                "'pass' or 'pass{option=value,...}' separated by commas")
        name, body = m.group(1), m.group(2)
        if name not in PASSES:
            raise PipelineError(f"unknown pass {name!r} in pipeline {text!r}; available passes: "
                                f"{', '.join(sorted(PASSES))}")
        info = PASSES[name]
        options: dict[str, Any] = {}
        for kv in filter(None, (s.strip() for s in (body or "").split(","))):
            k, eq, v = kv.partition("=")
            k = k.strip()
            if not eq:
                raise PipelineError(f"pass {name}: option {kv!r} needs a value (option=value)")
            if k not in info.options:
                valid = ", ".join(f"{o}: {spec.type.__name__}" for o, spec in info.options.items()) or "none"
                raise PipelineError(f"pass {name} has no option {k!r}; its options are: {valid}")
            options[k] = info.options[k].parse(v.strip(), f"pass {name}, option {k}")
        specs.append(PassSpec(name, options))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise PipelineError(f"cannot parse pipeline {text!r} at {text[pos:]!r}: expected ','")
            pos += 1
    return specs


def format_pipeline(specs: Sequence[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


# ---- numeric comparison --------------------------------------------------------------------------

@dataclass(frozen=True)
class Fidelity:
    """How far a graph's outputs are from the reference: max abs error, error relative to range, SQNR."""

    max_abs: float
    max_rel: float
    sqnr_db: float

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "sqnr_db": self.sqnr_db}


def compare(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> Fidelity:
    """Error of `outputs` vs `reference`; max_rel is max abs error over the reference's value range."""
    if len(outputs) != len(reference):
        raise PipelineError(f"graph gives {len(outputs)} outputs but the reference has {len(reference)}")
    max_abs, max_rel, sig, noise = 0.0, 0.0, 0.0, 0.0
    for o, r in zip(outputs, reference):
        o64, r64 = np.asarray(o, np.float64), np.asarray(r, np.float64)
        if o64.shape != r64.shape:
            raise PipelineError(f"output shape {o64.shape} differs from the reference's {r64.shape}")
        err = np.abs(o64 - r64)
        m = float(err.max()) if err.size else 0.0
        rng = float(r64.max() - r64.min()) if r64.size else 0.0
        max_abs = max(max_abs, m)
        max_rel = max(max_rel, m / rng if rng > 0 else m)
        sig += float((r64 ** 2).sum())
        noise += float((err ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-300) / noise)
    return Fidelity(max_abs, max_rel, sqnr)


# ---- instrumented execution ----------------------------------------------------------------------

@dataclass(frozen=True)
class StepRecord:
    """What one pipeline step did: timing, size figures, pass stats, fidelity vs the reference."""

    index: int
    name: str
    seconds: float
    changed: bool
    stats: GraphStats
    pass_stats: Mapping[str, Any]
    fidelity: Fidelity | None

    def to_json(self) -> dict:
        return {
            "index": self.index, "pass": self.name, "seconds": self.seconds, "changed": self.changed,
            "stats": self.stats.to_json(), "pass_stats": dict(self.pass_stats),
            "fidelity": self.fidelity.to_json() if self.fidelity else None,
        }


@dataclass(frozen=True)
class Instruments:
    """Which checks and dumps run around each pass."""

    verify_each: bool = True
    reference: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None  # (inputs, expected outputs)
    dump_dir: str | None = None
    print_after_all: bool = False
    print_changed: bool = False
    stream: TextIO = sys.stdout
    repro_dir: str | None = None  # where failure reproducers go (default: system temp dir)


def _dot(g: Graph) -> str:
    """Graphviz text of the dataflow graph (nodes only; parameters folded into their users' labels)."""
    lines = [f'digraph "{g.name}" {{', "  rankdir=TB; node [shape=box, fontname=monospace, fontsize=10];"]
    for name, t in g.inputs:
        lines.append(f'  "{name}" [shape=ellipse, label="{name}\\n{t}"];')
    for n in g.nodes:
        lines.append(f'  "{n.name}" [label="{n.name}\\n{n.op}\\n{", ".join(map(str, n.out_types))}"];')
        for v in n.inputs:
            prod = g.producer(v)
            if prod is not None:
                lines.append(f'  "{prod.name}" -> "{n.name}";')
            elif not g.is_param(v):
                lines.append(f'  "{v}" -> "{n.name}";')
    for o in g.outputs:
        prod = g.producer(o)
        lines.append(f'  "out:{o}" [shape=ellipse]; "{prod.name if prod else o}" -> "out:{o}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _write_step_dump(step_dir: str, g: Graph, prev_text: str | None, record: StepRecord) -> str:
    """Write ir.txt, diff.txt, model.onnx, graph.dot and stats.json for one step; return the IR text."""
    from slimc import export

    os.makedirs(step_dir, exist_ok=True)
    text = ir.print_graph(g)
    with open(os.path.join(step_dir, "ir.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(step_dir, "diff.txt"), "w") as f:
        if prev_text is not None:
            f.writelines(difflib.unified_diff(prev_text.splitlines(True), text.splitlines(True),
                                              "before/ir.txt", "after/ir.txt"))
    with open(os.path.join(step_dir, "graph.dot"), "w") as f:
        f.write(_dot(g))
    try:
        export.to_onnx(g, os.path.join(step_dir, "model.onnx"))
    except SlimcError as e:
        with open(os.path.join(step_dir, "model.onnx.txt"), "w") as f:
            f.write(f"no ONNX view of this step: {e}\n")
    with open(os.path.join(step_dir, "stats.json"), "w") as f:
        json.dump(record.to_json(), f, indent=2)
    return text


def write_reproducer(g: Graph, remaining: Sequence[PassSpec], where: str | None) -> str:
    """Save the failing pass's input graph and the rest of the pipeline so `slimc inspect` can replay it."""
    d = tempfile.mkdtemp(prefix="slimc-repro-", dir=where)
    try:
        ir.save(g, os.path.join(d, "input.slimc"))
    except IRError:
        pass
    with open(os.path.join(d, "input.ir.txt"), "w") as f:
        f.write(ir.print_graph(g))
    with open(os.path.join(d, "pipeline.txt"), "w") as f:
        f.write(format_pipeline(remaining) + "\n")
    with open(os.path.join(d, "README.txt"), "w") as f:
        f.write("Replay with:\n  slimc inspect input.slimc --passes \"$(cat pipeline.txt)\"\n")
    return d


class PassManager:
    """Runs a parsed pipeline over a graph, with the instruments around every pass."""

    def __init__(self, pipeline: str | Sequence[PassSpec], instruments: Instruments | None = None,
                 context: PassContext | None = None) -> None:
        self.specs = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.instruments = instruments or Instruments()
        self.context = context or PassContext()

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.specs)

    def _fidelity(self, g: Graph) -> Fidelity | None:
        ref = self.instruments.reference
        if ref is None:
            return None
        from slimc import interpreter

        return compare(interpreter.run(g, list(ref[0])), list(ref[1]))

    def run(self, graph: Graph) -> tuple[Graph, list[StepRecord]]:
        ins = self.instruments
        dump = ins.dump_dir
        if dump is not None:
            _prepare_dump_dir(dump)
        records: list[StepRecord] = []
        t0 = time.perf_counter()
        fid = self._fidelity(graph)
        rec = StepRecord(0, "input", time.perf_counter() - t0, False, graph_stats(graph), {}, fid)
        records.append(rec)
        prev_text = _write_step_dump(os.path.join(dump, "00_input"), graph, None, rec) if dump else None
        if ins.print_after_all:
            ins.stream.write(f"// ----- IR at input -----\n{ir.print_graph(graph)}")
        g = graph
        given = dict(self.context.inputs_of)
        for i, spec in enumerate(self.specs, start=1):
            info = PASSES[spec.name]
            ctx = dataclasses.replace(self.context, options=spec.resolved_options(),
                                      reference=graph if self.context.reference is None else self.context.reference,
                                      inputs_of=dict(given))
            given[spec.name] = PassInput(g, ctx.options)
            t0 = time.perf_counter()
            try:
                result = info.fn(g, ctx)
                if ins.verify_each:
                    result.graph.verify()
            except Exception as e:
                repro = write_reproducer(g, self.specs[i - 1:], ins.repro_dir)
                detail = str(e) if isinstance(e, SlimcError) else f"{type(e).__name__}: {e}"
                raise PipelineError(f"pass {spec} (step {i}) failed: {detail}. Its input graph and the rest of the "
                                    f"pipeline were written to {repro} (see README.txt there to replay).") from e
            seconds = time.perf_counter() - t0
            g = result.graph
            rec = StepRecord(i, str(spec), seconds, result.changed, graph_stats(g), dict(result.stats),
                             self._fidelity(g))
            records.append(rec)
            if dump:
                prev_text = _write_step_dump(os.path.join(dump, f"{i:02d}_{spec.name}"), g, prev_text, rec)
            if ins.print_after_all or (ins.print_changed and result.changed):
                ins.stream.write(f"// ----- IR after {spec} -----\n{ir.print_graph(g)}")
        if dump:
            with open(os.path.join(dump, "pipeline.json"), "w") as f:
                json.dump({"pipeline": self.pipeline, "steps": [r.to_json() for r in records]}, f, indent=2)
        return g, records


def _prepare_dump_dir(path: str) -> None:
    """Create (or empty our own previous dump in) `path`, failing early with a clear message."""
    try:
        if os.path.isdir(path) and os.listdir(path):
            if not os.path.exists(os.path.join(path, "00_input")):
                raise PipelineError(f"dump dir {path} exists and is not empty (and is not a previous slimc dump); "
                                    "choose a new or empty directory")
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PipelineError(f"cannot write to dump dir {path}: {e.strerror or e}. Pass a writable --dump-dir.") from None
