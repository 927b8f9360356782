"""ONNX frontend: reads a model (default domain, opsets 7–21) into a slimc Graph with concrete shapes.

Every ONNX op has one entry in `TABLE`: a converter emitting IR nodes and/or a numpy folder used when all its
inputs are known at import (shape sub-graphs: Shape→Gather→Concat→Reshape, ...). Graph inputs get concrete
shapes (symbolic dims from `input_shapes`, batch 1 by default), so every shape computation folds.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import onnx
from onnx import numpy_helper

from slimc import ops
from slimc.errors import FrontendError, IRError
from slimc.ir import DTYPES, Graph, Node, TensorType, sanitize_name, unique_name

MIN_OPSET, MAX_OPSET = 7, 21
DEFAULT_DOMAINS = ("", "ai.onnx")

Shape = tuple[int, ...]
InputShapes = Union[Mapping[str, Sequence[int]], Sequence[Sequence[int]], Sequence[int], None]


# ---- the conversion table -------------------------------------------------------------------------

@dataclass(frozen=True)
class OnnxNode:
    """One ONNX node with decoded attributes, as converters and error messages see it."""

    proto: onnx.NodeProto
    index: int
    attrs: Mapping[str, Any]

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def name(self) -> str:
        return self.proto.name or f"#{self.index}"

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.proto.output)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def has_input(self, i: int) -> bool:
        return i < len(self.proto.input) and self.proto.input[i] != ""

    def source(self) -> tuple[str, str]:
        """Provenance of the IR nodes it becomes: ONNX node name and op type (like the torch frontend's pair)."""
        return (self.name, self.op_type)


Converter = Callable[["_Importer", OnnxNode], None]
Folder = Callable[["_Importer", OnnxNode, list[Union[np.ndarray, None]]], list[np.ndarray]]


@dataclass
class Rule:
    """How one ONNX op type is imported: `convert` emits IR nodes, `fold` evaluates it on known inputs."""

    convert: Converter | None = None
    fold: Folder | None = None


TABLE: dict[str, Rule] = {}


def converts(*op_types: str) -> Callable[[Converter], Converter]:
    """Register the IR converter of one or more ONNX op types."""

    def deco(fn: Converter) -> Converter:
        for t in op_types:
            TABLE.setdefault(t, Rule()).convert = fn
        return fn

    return deco


def folds(*op_types: str) -> Callable[[Folder], Folder]:
    """Register the numpy evaluation of one or more ONNX op types (used when all inputs are constants)."""

    def deco(fn: Folder) -> Folder:
        for t in op_types:
            TABLE.setdefault(t, Rule()).fold = fn
        return fn

    return deco


def supported_ops() -> list[str]:
    """ONNX op types (default domain) this frontend imports."""
    return sorted(TABLE)


def _supported_summary() -> str:
    """The op list for error messages, telling apart ops that only fold on constants (shape arithmetic)."""
    full = sorted(k for k, r in TABLE.items() if r.convert is not None or k == "Constant")
    folded = sorted(k for k in TABLE if k not in full)
    return f"{', '.join(full)}; on constant inputs only: {', '.join(folded)}"


# ---- loading and validation -----------------------------------------------------------------------

def _fail(src: str, msg: str) -> FrontendError:
    return FrontendError(f"{src}: {msg}")


def _read_model(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str, str | None]:
    """Parse the file (without external data) or take the proto; return it, a label and its directory."""
    if isinstance(model, onnx.ModelProto):
        return model, f"ONNX model {model.graph.name or '(unnamed)'}", None
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FrontendError(f"{path}: no such file. Check the path of the ONNX model (export one with "
                            f"torch.onnx.export or download it first).")
    if not os.path.isfile(path):
        raise FrontendError(f"{path} is not a regular file; pass the path of a .onnx model file.")
    try:
        proto = onnx.load_model(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError; truncated files raise various parse errors
        raise FrontendError(f"{path}: cannot be decoded as an ONNX model ({type(e).__name__}: {e}). The file is "
                            f"truncated or not ONNX; re-export or re-download it.") from None
    if proto.ir_version == 0 and not proto.graph.node and not proto.opset_import:
        raise FrontendError(f"{path}: decodes as an empty protobuf, not an ONNX model (no IR version, no graph). "
                            f"Check that this is the .onnx file and not some other format.")
    return proto, path, os.path.dirname(os.path.abspath(path))


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor stored in a graph: initializers and tensor attributes, recursing into sub-graphs."""
    for t in graph.initializer:
        yield f"initializer {t.name!r}", t
    for st in graph.sparse_initializer:
        yield f"sparse initializer {st.values.name!r}", st.values
        yield f"sparse initializer {st.values.name!r} (indices)", st.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield f"attribute {a.name!r} of node {node.name!r}", a.t
            for t in a.tensors:
                yield f"attribute {a.name!r} of node {node.name!r}", t
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for g in a.graphs:
                yield from _graph_tensors(g)


def _check_external_locations(proto: onnx.ModelProto, base_dir: str | None, src: str) -> bool:
    """Refuse external data outside the model's directory (absolute paths, `..`, symlinks out); True if any."""
    found = False
    for what, t in _graph_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if base_dir is None:
            raise _fail(src, f"{what} keeps its data in an external file ({loc!r}) but the model was passed as a "
                             f"ModelProto without it; pass the .onnx path instead so the data can be found.")
        if not loc:
            raise _fail(src, f"{what} is marked as external data but has no 'location'; re-save the model "
                             f"with onnx.save_model(..., save_as_external_data=True).")
        if os.path.isabs(loc) or os.path.splitdrive(loc)[0]:
            raise _fail(src, f"{what} points to external data at the absolute path {loc!r}; slimc only reads "
                             f"external data next to the model. Move the data into {base_dir} and re-save with a "
                             f"relative location.")
        root = os.path.realpath(base_dir)
        full = os.path.realpath(os.path.join(base_dir, loc))
        if os.path.commonpath([root, full]) != root:
            raise _fail(src, f"{what} points to external data {loc!r}, which resolves outside the model's "
                             f"directory {base_dir}; slimc refuses to read it. Move the data next to the model "
                             f"and re-save with a relative location.")
        if not os.path.isfile(full):
            raise _fail(src, f"{what} needs the external data file {loc!r}, which is missing from {base_dir}; "
                             f"copy it next to the model.")
    return found


def _default_opset(proto: onnx.ModelProto, src: str) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise _fail(src, "the model imports no default-domain (ai.onnx) opset; re-export it with a standard "
                         "opset (torch.onnx.export(..., opset_version=17)).")
    v = max(versions)
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise _fail(src, f"opset {v} is outside the supported range {MIN_OPSET}–{MAX_OPSET}; convert it with "
                         f"onnx.version_converter.convert_version(model, 17) or re-export with opset 17.")
    return v


def _check_supported_ops(proto: onnx.ModelProto, opset: int, src: str) -> None:
    """Name every unsupported op (type, first node, domain) before any conversion starts."""
    bad: dict[tuple[str, str], str] = {}
    for i, n in enumerate(proto.graph.node):
        if n.domain not in DEFAULT_DOMAINS or n.op_type not in TABLE:
            bad.setdefault((n.domain or "ai.onnx", n.op_type), n.name or f"#{i}")
    if not bad:
        return
    items = []
    for (domain, op), node in bad.items():
        kind = "custom domain" if domain not in DEFAULT_DOMAINS else "domain"
        items.append(f"{op} ({kind} {domain!r}, e.g. node {node!r})")
    custom = any(d not in DEFAULT_DOMAINS for d, _ in bad)
    hint = ("slimc reads only the default ONNX domain (ai.onnx); replace custom-domain ops with standard ones "
            "before import. " if custom else "")
    raise _fail(src, f"unsupported op(s) at opset {opset}: {'; '.join(items)}. {hint}Re-export the model so that "
                     f"it uses only supported ops, or add a converter in slimc/frontend/onnx.py. Supported ops: "
                     f"{_supported_summary()}.")


def _load_external(proto: onnx.ModelProto, base_dir: str, src: str) -> None:
    try:
        onnx.load_external_data_for_model(proto, base_dir)
    except Exception as e:
        raise _fail(src, f"cannot read the model's external data from {base_dir} ({type(e).__name__}: {e}); "
                         f"check that the data files are complete.") from None


@contextlib.contextmanager
def _io_shapes_declared(proto: onnx.ModelProto) -> Iterator[None]:
    """Let the checker pass graph inputs/outputs that declare no shape (ONNX Runtime runs such models).

    The checker insists on a `shape` field there; an empty one is added for the check and removed afterwards.
    """
    missing = [vi.type.tensor_type for vi in list(proto.graph.input) + list(proto.graph.output)
               if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    for t in missing:
        t.shape.SetInParent()
    try:
        yield
    finally:
        for t in missing:
            t.ClearField("shape")


def _check_model(proto: onnx.ModelProto, path: str | None, src: str) -> None:
    try:
        with _io_shapes_declared(proto):
            try:
                onnx.checker.check_model(proto)
            except ValueError:
                if path is None:
                    raise
                onnx.checker.check_model(path)  # > 2 GB: the checker needs the file
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(src, f"the model fails onnx.checker ({first}). Fix the exporter output "
                         f"(e.g. re-export with torch.onnx.export) and check it with onnx.checker.check_model.") \
            from None


# ---- input shapes ---------------------------------------------------------------------------------

def _onnx_dtype(elem_type: int) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except Exception:
        return f"elem_type {elem_type}"


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Model's declared dims (int, symbol name, or None if unknown); None if the rank is unknown."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _normalize_input_shapes(names: list[str], spec: InputShapes, src: str) -> dict[str, Shape]:
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in names and k not in map(sanitize_name, names)]
        if unknown:
            raise _fail(src, f"input_shapes names {', '.join(map(repr, unknown))}, but the model's inputs are "
                             f"{', '.join(map(repr, names))}.")
        out = {}
        for n in names:
            if n in spec or sanitize_name(n) in spec:
                out[n] = tuple(spec[n] if n in spec else spec[sanitize_name(n)])
        return out
    seq = list(spec)
    if seq and all(isinstance(d, (int, np.integer)) for d in seq):
        seq = [tuple(seq)]  # one bare shape
    if len(seq) != len(names):
        raise _fail(src, f"got {len(seq)} input shape(s) but the model has {len(names)} input(s) "
                         f"({', '.join(map(repr, names))}); pass one shape per input, in order.")
    return {n: tuple(s) for n, s in zip(names, seq)}


def _concrete_shape(vi: onnx.ValueInfoProto, given: Shape | None, src: str) -> Shape:
    """The input's concrete shape: the user's (checked against the model) or the model's with batch 1."""
    declared = _declared_dims(vi)
    if given is not None:
        if any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d <= 0 for d in given):
            raise _fail(src, f"input shape {given} for {vi.name!r} must be positive integers.")
        if declared is not None and len(declared) != len(given):
            raise _fail(src, f"input {vi.name!r} has rank {len(declared)} (declared {_fmt_dims(declared)}) but "
                             f"the given shape {tuple(given)} has rank {len(given)}; pass a shape of rank "
                             f"{len(declared)}.")
        for i, (d, g) in enumerate(zip(declared or (), given)):
            if isinstance(d, int) and d != g:
                raise _fail(src, f"input {vi.name!r} has static dim {i} = {d} (declared {_fmt_dims(declared)}) "
                                 f"but the given shape {tuple(given)} says {g}; only symbolic dims can be chosen.")
        return tuple(int(g) for g in given)
    if declared is None:
        raise _fail(src, f"input {vi.name!r} declares no shape; pass input_shapes={{{vi.name!r}: (...)}}.")
    out = []
    for i, d in enumerate(declared):
        if isinstance(d, int):
            out.append(d)
        elif i == 0:
            out.append(1)
        else:
            raise _fail(src, f"input {vi.name!r} has symbolic dim {i} ({d or '?'}) in {_fmt_dims(declared)}; pass "
                             f"input_shapes={{{vi.name!r}: (...)}} with concrete sizes (only the batch dim "
                             f"defaults to 1).")
    return tuple(out)


def _fmt_dims(dims: Sequence[int | str | None] | None) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims or ()) + "]"


# ---- the importer ---------------------------------------------------------------------------------

@dataclass
class _Importer:
    """Conversion state: known constants, ONNX→IR value map, emitted nodes and weights."""

    opset: int
    src: str
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    types: dict[str, TensorType] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)
    materialized: dict[tuple[str, str], str] = field(default_factory=dict)
    node: OnnxNode | None = None

    # -- errors and names --
    def error(self, msg: str) -> FrontendError:
        n = self.node
        where = f"node {n.name!r} ({n.op_type}, opset {self.opset})" if n else "graph"
        return _fail(self.src, f"{where}: {msg}")

    def fresh(self, base: str) -> str:
        name = unique_name(sanitize_name(base), self.taken)
        self.taken.add(name)
        return name

    # -- constants --
    def is_const(self, onnx_name: str) -> bool:
        return onnx_name in self.consts

    def const(self, i: int, what: str) -> np.ndarray:
        """Input i of the current node as a known array; it must be a constant."""
        n = self.node
        assert n is not None
        name = n.inputs[i] if n.has_input(i) else ""
        if name not in self.consts:
            raise self.error(f"input {i} ({what}, {name!r}) must be known at import time (an initializer, a "
                             f"Constant or a foldable shape computation), but it is computed at run time.")
        return self.consts[name]

    def opt_const(self, i: int, what: str) -> np.ndarray | None:
        assert self.node is not None
        return self.const(i, what) if self.node.has_input(i) else None

    def set_const(self, onnx_name: str, arr: np.ndarray) -> None:
        if onnx_name:
            self.consts[onnx_name] = np.asarray(arr)

    # -- IR values --
    def param(self, base: str, arr: np.ndarray) -> str:
        """A new IR parameter holding `arr`."""
        name = self.fresh(base)
        arr = np.asarray(arr)  # not ascontiguousarray: it turns scalars (per-tensor scales) into [1]
        if not arr.flags.c_contiguous or not arr.flags.writeable:  # numpy_helper gives read-only views
            arr = arr.copy()
        self.weights[name] = arr
        self.types[name] = TensorType.of(arr)
        return name

    def value(self, onnx_name: str, dtype: str | None = None) -> str:
        """The IR value of an ONNX tensor; constants become parameters (cast to `dtype` if given)."""
        if onnx_name in self.consts:
            arr = self.consts[onnx_name]
            dt = dtype or str(arr.dtype)
            key = (onnx_name, dt)
            if key not in self.materialized:
                self.materialized[key] = self.param(onnx_name, arr.astype(dt, copy=False))
            return self.materialized[key]
        try:
            return self.values[onnx_name]
        except KeyError:
            raise self.error(f"input {onnx_name!r} is not produced by any earlier node nor a graph "
                             f"input/initializer.") from None

    def input(self, i: int, dtype: str | None = None) -> str:
        assert self.node is not None
        return self.value(self.node.inputs[i], dtype)

    def type_of(self, onnx_name: str) -> TensorType:
        if onnx_name in self.consts:
            return TensorType.of(self.consts[onnx_name])
        return self.types[self.value(onnx_name)]

    def shape(self, i: int) -> Shape:
        assert self.node is not None
        t = self.type_of(self.node.inputs[i])
        if not t.is_static:
            raise self.error(f"input {i} has non-static shape {t}")
        return tuple(int(d) for d in t.shape)  # type: ignore[arg-type]

    def dtype(self, i: int) -> str:
        assert self.node is not None
        return self.type_of(self.node.inputs[i]).dtype

    # -- emission --
    def emit(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None, *,
             out: int | None = 0, suffix: str = "") -> tuple[str, ...]:
        """Append one IR node; with `out`, it is named after (and bound to) that ONNX output."""
        n = self.node
        assert n is not None
        base = n.outputs[0] if n.outputs and n.outputs[0] else n.name
        name = self.fresh(n.outputs[out] if out is not None else f"{base}.{suffix or op}")
        try:
            node = ops.make_node(name, op, inputs, [self.types[v] for v in inputs], attrs or {}, n.source())
        except IRError as e:
            raise self.error(f"cannot express it as IR op {op}: {e}") from None
        self.nodes.append(node)
        for o, t in zip(node.outputs, node.out_types):
            self.types[o] = t
            self.taken.add(o)
        if out is not None and len(node.outputs) == 1:
            self.values[n.outputs[out]] = node.outputs[0]
        return node.outputs

    def alias(self, out: int, ir_value: str) -> None:
        """Bind ONNX output `out` of the current node to an existing IR value (no node emitted)."""
        assert self.node is not None
        self.values[self.node.outputs[out]] = ir_value

    def check_unused_outputs(self, first_unused: int, what: str) -> None:
        assert self.node is not None
        for o in self.node.outputs[first_unused:]:
            if o and o in self.used:
                raise self.error(f"its output {o!r} ({what}) is used, which slimc cannot express; only the main "
                                 f"output of this op is supported.")

    # -- the driver --
    def run_node(self, n: OnnxNode) -> None:
        self.node = n
        rule = TABLE[n.op_type]
        present = [x for x in n.inputs if x]
        if rule.fold is not None and all(x in self.consts for x in present):
            args = [self.consts[x] if x else None for x in n.inputs]
            try:
                results = rule.fold(self, n, args)
            except FrontendError:
                raise
            except Exception as e:  # numpy errors on malformed shape arithmetic
                raise self.error(f"evaluating it on its constant inputs failed ({type(e).__name__}: {e}).") \
                    from None
            for o, r in zip(n.outputs, results):
                self.set_const(o, r)
            return
        if rule.convert is None:
            computed = [x for x in present if x not in self.consts]
            raise self.error(f"slimc evaluates {n.op_type} only on inputs known at import (shape arithmetic), but "
                             f"input {computed[0]!r} is computed at run time. Re-export with static shapes or "
                             f"simplify the model (e.g. onnxsim).")
        rule.convert(self, n)


def _attrs_of(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as Python values (str, ints, numpy arrays) so converters need no protobuf knowledge."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out[a.name] = v
    return out


def _live_nodes(nodes: Sequence[Node], outputs: Sequence[str]) -> list[Node]:
    """Drop nodes none of whose outputs reach a graph output (dead shape branches, unused outputs)."""
    live = set(outputs)
    keep: list[Node] = []
    for n in reversed(nodes):
        if any(o in live for o in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    return keep[::-1]


def from_onnx(model: str | os.PathLike[str] | onnx.ModelProto, input_shapes: InputShapes = None,
              name: str | None = None) -> Graph:
    """Import an ONNX model as a slimc Graph with concrete shapes; raises FrontendError on bad input."""
    proto, src, base_dir = _read_model(model)
    opset = _default_opset(proto, src)
    has_external = _check_external_locations(proto, base_dir, src)
    _check_supported_ops(proto, opset, src)
    if has_external:
        assert base_dir is not None
        proto = _copy(proto) if isinstance(model, onnx.ModelProto) else proto
        _load_external(proto, base_dir, src)
    _check_model(proto, None if isinstance(model, onnx.ModelProto) else os.fspath(model), src)
    return _convert(proto, opset, src, input_shapes, name or _default_name(proto, model))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _default_name(proto: onnx.ModelProto, model: Any) -> str:
    """The file's stem (exporters name every graph 'torch_jit' or 'main_graph'), else the graph's name."""
    if not isinstance(model, onnx.ModelProto):
        return os.path.splitext(os.path.basename(os.fspath(model)))[0]
    return proto.graph.name or "onnx_model"


def _convert(proto: onnx.ModelProto, opset: int, src: str, input_shapes: InputShapes, name: str) -> Graph:
    """Bind inputs with concrete shapes, run every node through the table, keep what reaches the outputs."""
    g = proto.graph
    imp = _Importer(opset, src)
    for t in g.initializer:
        imp.set_const(t.name, numpy_helper.to_array(t))
    for st in g.sparse_initializer:
        imp.set_const(st.values.name, _sparse_to_dense(st))
    inputs = [vi for vi in g.input if vi.name not in imp.consts]
    shapes = _normalize_input_shapes([vi.name for vi in inputs], input_shapes, src)
    ir_inputs: list[tuple[str, TensorType]] = []
    for vi in inputs:
        elem = vi.type.tensor_type.elem_type
        dtype = _onnx_dtype(elem)
        if dtype not in DTYPES.values():
            raise _fail(src, f"input {vi.name!r} has element type {dtype}, which the IR does not support.")
        t = TensorType(_concrete_shape(vi, shapes.get(vi.name), src), dtype)
        ir_name = imp.fresh(vi.name)
        imp.values[vi.name] = ir_name
        imp.types[ir_name] = t
        ir_inputs.append((ir_name, t))
    imp.used = {x for n in g.node for x in n.input if x} | {o.name for o in g.output}
    for i, n in enumerate(g.node):
        imp.run_node(OnnxNode(n, i, _attrs_of(n)))
    imp.node = None
    outputs = tuple(imp.value(o.name) for o in g.output)
    nodes = _live_nodes(imp.nodes, outputs)
    used = {v for n in nodes for v in n.inputs} | set(outputs)
    weights = {k: v for k, v in imp.weights.items() if k in used}
    graph = Graph.from_weights(sanitize_name(name), ir_inputs, outputs, nodes, weights)
    try:
        graph.verify()
    except IRError as e:
        raise _fail(src, f"the imported graph does not verify ({e}); please report this as a slimc bug.") from None
    return graph


def _sparse_to_dense(st: onnx.SparseTensorProto) -> np.ndarray:
    vals = numpy_helper.to_array(st.values)
    idx = numpy_helper.to_array(st.indices)
    dense = np.zeros(tuple(st.dims), dtype=vals.dtype)
    if idx.ndim == 1:
        dense.reshape(-1)[idx] = vals
    else:
        dense[tuple(idx.T)] = vals
    return dense


# ---- shared helpers for converters/folders --------------------------------------------------------

def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _axes(imp: _Importer, n: OnnxNode, input_index: int, since: int) -> list[int] | None:
    """Axes from the attribute (opset < since) or from a constant input (opset >= since); None if absent."""
    if imp.opset >= since:
        arr = imp.opt_const(input_index, "axes")
        return None if arr is None else _ints(arr)
    a = n.attr("axes")
    return None if a is None else [int(v) for v in a]


def _norm_axes(imp: _Importer, axes: Sequence[int], rank: int) -> list[int]:
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise imp.error(f"axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    return out


def _squeezed(imp: _Importer, n: OnnxNode, shape: Shape) -> Shape:
    axes = _axes(imp, n, 1, 13)
    if axes is None:
        return tuple(d for d in shape if d != 1)
    ax = set(_norm_axes(imp, axes, len(shape)))
    for a in ax:
        if shape[a] != 1:
            raise imp.error(f"cannot squeeze axis {a} of size {shape[a]}")
    return tuple(d for i, d in enumerate(shape) if i not in ax)


def _unsqueezed(imp: _Importer, n: OnnxNode, shape: Shape) -> Shape:
    axes = _axes(imp, n, 1, 13)
    if axes is None:
        raise imp.error("Unsqueeze needs axes")
    rank = len(shape) + len(axes)
    ax = set(_norm_axes(imp, axes, rank))
    it = iter(shape)
    return tuple(1 if i in ax else next(it) for i in range(rank))


def _reshape_target(imp: _Importer, shape: Shape, target: Sequence[int], allowzero: bool) -> Shape:
    """ONNX Reshape semantics (0 copies the input dim unless allowzero, one -1 is inferred) → concrete dims."""
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(target)]
    total = math.prod(shape)
    if out.count(-1) > 1:
        raise imp.error(f"target shape {list(target)} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise imp.error(f"cannot reshape {list(shape)} to {list(target)}")
        out[out.index(-1)] = total // known
    if math.prod(out) != total:
        raise imp.error(f"cannot reshape {list(shape)} ({total} elements) to {list(target)}")
    return tuple(out)


def _flattened(imp: _Importer, n: OnnxNode, shape: Shape) -> Shape:
    axis = int(n.attr("axis", 1))
    if not -len(shape) <= axis <= len(shape):
        raise imp.error(f"axis {axis} out of range for rank {len(shape)}")
    axis += len(shape) if axis < 0 else 0
    return (math.prod(shape[:axis]), math.prod(shape[axis:]))


def _slice_specs(imp: _Importer, n: OnnxNode, shape: Shape) -> list[tuple[int, slice]]:
    """Per-axis Python slices of an ONNX Slice (attribute form before opset 10, inputs since)."""
    if imp.opset < 10:
        starts, ends = _ints(n.attr("starts", [])), _ints(n.attr("ends", []))
        axes = _ints(n.attr("axes")) if n.attr("axes") is not None else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(imp.const(1, "starts")), _ints(imp.const(2, "ends"))
        ax = imp.opt_const(3, "axes")
        st = imp.opt_const(4, "steps")
        axes = _ints(ax) if ax is not None else list(range(len(starts)))
        steps = _ints(st) if st is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise imp.error("starts, ends, axes and steps differ in length")
    out = []
    for a, s, e, k in zip(_norm_axes(imp, axes, len(shape)), starts, ends, steps):
        if k == 0:
            raise imp.error("slice step 0")
        out.append((a, slice(s, e, k)))
    return out


def _split_sizes(imp: _Importer, n: OnnxNode, dim: int) -> list[int]:
    count = len(n.outputs)
    if imp.opset >= 13:
        arr = imp.opt_const(1, "split")
        sizes = _ints(arr) if arr is not None else None
    else:
        sizes = _ints(n.attr("split")) if n.attr("split") is not None else None
    if sizes is None and n.attr("num_outputs") is not None:
        k = int(n.attr("num_outputs"))
        chunk = -(-dim // k)
        sizes = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
    if sizes is None:
        if dim % count:
            raise imp.error(f"cannot split {dim} evenly into {count} outputs")
        sizes = [dim // count] * count
    if sum(sizes) != dim or len(sizes) != count or any(s < 0 for s in sizes):
        raise imp.error(f"split sizes {sizes} do not fit dim {dim} with {count} outputs")
    return sizes


def _gather_index(imp: _Importer, indices: np.ndarray, dim: int) -> np.ndarray:
    idx = np.asarray(indices).astype(np.int64)
    if np.any(idx < -dim) or np.any(idx >= dim):
        raise imp.error(f"gather index out of range for dim {dim}")
    return np.where(idx < 0, idx + dim, idx)


def _spatial_pads(imp: _Importer, n: OnnxNode, in_hw: Shape, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> tuple[int, int, int, int]:
    """[top, left, bottom, right] from pads or auto_pad (ONNX pads are [x1_begin, x2_begin, x1_end, x2_end])."""
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = _ints(n.attr("pads", [0, 0, 0, 0]))
        if len(p) != 4:
            raise imp.error(f"expected 4 pads for a 2-D op, got {p}")
        return (p[0], p[1], p[2], p[3])
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise imp.error(f"unknown auto_pad {auto!r}")
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def _need_rank(imp: _Importer, i: int, rank: int, what: str) -> Shape:
    s = imp.shape(i)
    if len(s) != rank:
        raise imp.error(f"slimc supports only the {what} form (rank-{rank} input), got shape {list(s)}")
    return s


def _bound(v: Any) -> float | None:
    """A Clip bound as float, or None when absent or infinite."""
    if v is None:
        return None
    f = float(np.asarray(v).reshape(-1)[0])
    return None if math.isinf(f) else f


# ---- folders (numpy on constants) -----------------------------------------------------------------

@folds("Constant")
def _fold_constant(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    a = n.attrs
    if "value" in a:
        return [np.asarray(a["value"])]
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in a:
            return [np.asarray(a[key], dtype=dt)]
    raise imp.error(f"unsupported Constant attribute(s) {', '.join(a)} (sparse or string constants)")


@folds("ConstantOfShape")
def _fold_const_of_shape(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    v = n.attr("value")
    fill = np.asarray(v).reshape(-1)[0] if v is not None else np.float32(0)
    return [np.full(tuple(_ints(args[0])), fill, dtype=np.asarray(fill).dtype)]


@folds("Range")
def _fold_range(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    start, limit, delta = (np.asarray(a).reshape(()) for a in args)
    return [np.arange(start, limit, delta, dtype=start.dtype)]


def _np_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(a.dtype)
    return np.divide(a, b).astype(a.dtype)


_NP_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": lambda a, b: (a + b).astype(a.dtype), "Sub": lambda a, b: (a - b).astype(a.dtype),
    "Mul": lambda a, b: (a * b).astype(a.dtype), "Div": _np_div,
    "Pow": lambda a, b: np.power(a, b).astype(a.dtype),
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
}
_NP_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt, "Floor": np.floor, "Ceil": np.ceil, "Exp": np.exp,
    "Not": np.logical_not, "Sign": np.sign, "Identity": lambda a: a,
    "Reciprocal": lambda a: (1 / a).astype(a.dtype), "Relu": lambda a: np.maximum(a, 0).astype(a.dtype),
    "Sigmoid": lambda a: (1 / (1 + np.exp(-a))).astype(a.dtype), "Tanh": np.tanh,
}


@folds(*_NP_BINARY)
def _fold_binary(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [np.asarray(_NP_BINARY[n.op_type](args[0], args[1]))]


@folds(*_NP_UNARY)
def _fold_unary(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [np.asarray(_NP_UNARY[n.op_type](args[0]))]


@folds("Max", "Min", "Sum")
def _fold_variadic(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    fn = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}[n.op_type]
    out = args[0]
    for a in args[1:]:
        out = fn(out, a).astype(args[0].dtype)
    return [np.asarray(out)]


@folds("Where")
def _fold_where(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [np.where(args[0], args[1], args[2])]


@folds("Cast")
def _fold_cast(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(int(n.attr("to"))))]


@folds("Gather")
def _fold_gather(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    axis = int(n.attr("axis", 0)) % max(args[0].ndim, 1)
    return [np.take(args[0], _gather_index(imp, args[1], args[0].shape[axis]), axis=axis)]


@folds("Unsqueeze")
def _fold_unsqueeze(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [args[0].reshape(_unsqueezed(imp, n, args[0].shape))]


@folds("Squeeze")
def _fold_squeeze(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [args[0].reshape(_squeezed(imp, n, args[0].shape))]


@folds("Concat")
def _fold_concat(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [np.concatenate([a for a in args if a is not None], axis=int(n.attr("axis")))]


@folds("Slice")
def _fold_slice(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    idx = [slice(None)] * args[0].ndim
    for axis, sl in _slice_specs(imp, n, args[0].shape):
        idx[axis] = sl
    return [args[0][tuple(idx)].copy()]


@folds("Reshape")
def _fold_reshape(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    target = _reshape_target(imp, args[0].shape, _ints(args[1]), bool(n.attr("allowzero", 0)))
    return [args[0].reshape(target)]


@folds("Flatten")
def _fold_flatten(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [args[0].reshape(_flattened(imp, n, args[0].shape))]


@folds("Transpose")
def _fold_transpose(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    perm = n.attr("perm")
    return [np.transpose(args[0], None if perm is None else [int(p) for p in perm]).copy()]


@folds("Expand")
def _fold_expand(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    shape = np.broadcast_shapes(args[0].shape, tuple(_ints(args[1])))
    return [np.broadcast_to(args[0], shape).copy()]


@folds("Tile")
def _fold_tile(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    return [np.tile(args[0], _ints(args[1]))]


@folds("Split")
def _fold_split(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    axis = int(n.attr("axis", 0)) % args[0].ndim
    sizes = _split_sizes(imp, n, args[0].shape[axis])
    return [a.copy() for a in np.split(args[0], np.cumsum(sizes)[:-1], axis=axis)]


@folds("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean")
def _fold_reduce(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    fn = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min,
          "ReduceMean": np.mean}[n.op_type]
    since = 13 if n.op_type == "ReduceSum" else 18
    axes = _axes(imp, n, 1, since)
    if not axes and n.attr("noop_with_empty_axes", 0):
        return [args[0]]
    ax = None if not axes else tuple(_norm_axes(imp, axes, args[0].ndim))
    return [np.asarray(fn(args[0], axis=ax, keepdims=bool(n.attr("keepdims", 1)))).astype(args[0].dtype)]


# ---- converters: shape and data movement ----------------------------------------------------------

@converts("Shape")
def _shape(imp: _Importer, n: OnnxNode) -> None:
    """Shapes are concrete at import, so Shape is always a constant (this is what makes shape sub-graphs fold)."""
    shape = imp.shape(0)
    start, end = int(n.attr("start", 0)), n.attr("end")
    imp.set_const(n.outputs[0], np.asarray(shape[start:None if end is None else int(end)], dtype=np.int64))


@converts("Size")
def _size(imp: _Importer, n: OnnxNode) -> None:
    imp.set_const(n.outputs[0], np.asarray(math.prod(imp.shape(0)), dtype=np.int64))


@converts("Identity")
def _identity(imp: _Importer, n: OnnxNode) -> None:
    imp.emit("identity", [imp.input(0)])


@converts("Dropout")
def _dropout(imp: _Importer, n: OnnxNode) -> None:
    """Kept as dropout (canonicalize drops it); its mask output cannot be used."""
    imp.check_unused_outputs(1, "dropout mask")
    if imp.opset >= 12:
        ratio = imp.opt_const(1, "ratio")
        training = imp.opt_const(2, "training_mode")
        if training is not None and bool(np.asarray(training).reshape(-1)[0]):
            raise imp.error("training_mode=true; export the model in eval mode")
        p = 0.5 if ratio is None else float(np.asarray(ratio).reshape(-1)[0])
    else:
        p = float(n.attr("ratio", 0.5))
    imp.emit("dropout", [imp.input(0)], {"p": p})


@converts("Cast")
def _cast(imp: _Importer, n: OnnxNode) -> None:
    """The IR has no cast op; exporters emit same-type Casts, which are aliases."""
    to = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(n.attr("to")))))
    if to != imp.dtype(0):
        raise imp.error(f"casting a run-time tensor from {imp.dtype(0)} to {to} has no IR op; only casts to the "
                        f"same type (no-ops) and casts of constants are supported.")
    imp.alias(0, imp.input(0))


@converts("Reshape")
def _reshape(imp: _Importer, n: OnnxNode) -> None:
    """Targets are resolved to concrete dims so later passes never see ONNX 0/-1 conventions."""
    target = _reshape_target(imp, imp.shape(0), _ints(imp.const(1, "shape")), bool(n.attr("allowzero", 0)))
    imp.emit("reshape", [imp.input(0)], {"shape": target})


@converts("Flatten")
def _flatten(imp: _Importer, n: OnnxNode) -> None:
    """ONNX Flatten is always 2-D [prod(d<axis), prod(d>=axis)]; only axis=1 is IR flatten(1, -1)."""
    shape = imp.shape(0)
    target = _flattened(imp, n, shape)
    if int(n.attr("axis", 1)) == 1 and len(shape) >= 2:
        imp.emit("flatten", [imp.input(0)], {"start": 1, "end": -1})
    else:
        imp.emit("reshape", [imp.input(0)], {"shape": target})


@converts("Squeeze")
def _squeeze(imp: _Importer, n: OnnxNode) -> None:
    imp.emit("reshape", [imp.input(0)], {"shape": _squeezed(imp, n, imp.shape(0))})


@converts("Unsqueeze")
def _unsqueeze(imp: _Importer, n: OnnxNode) -> None:
    imp.emit("reshape", [imp.input(0)], {"shape": _unsqueezed(imp, n, imp.shape(0))})


@converts("Transpose")
def _transpose(imp: _Importer, n: OnnxNode) -> None:
    rank = len(imp.shape(0))
    perm = n.attr("perm")
    perm = list(reversed(range(rank))) if perm is None else [int(p) for p in perm]
    imp.emit("transpose", [imp.input(0)], {"perm": tuple(perm)})


@converts("Expand")
def _expand(imp: _Importer, n: OnnxNode) -> None:
    """Exporters emit no-op Expands after folding; real broadcasts have no IR op."""
    shape = imp.shape(0)
    target = tuple(int(d) for d in np.broadcast_shapes(shape, tuple(_ints(imp.const(1, "shape")))))
    if target != shape:
        raise imp.error(f"expanding a run-time tensor {list(shape)} to {list(target)} has no IR op; only no-op "
                        f"expands are supported.")
    imp.alias(0, imp.input(0))


@converts("Concat")
def _concat(imp: _Importer, n: OnnxNode) -> None:
    present = [x for x in n.inputs if x]
    dyn = [x for x in present if not imp.is_const(x)]
    dtype = imp.type_of(dyn[0]).dtype
    imp.emit("concat", [imp.value(x, dtype) for x in present], {"axis": int(n.attr("axis"))})


@converts("Split")
def _split(imp: _Importer, n: OnnxNode) -> None:
    """Sizes come from the attribute (< 13), the input (>= 13) or num_outputs (18)."""
    shape = imp.shape(0)
    axis = _norm_axes(imp, [int(n.attr("axis", 0))], len(shape))[0]
    sizes = _split_sizes(imp, n, shape[axis])
    if len(sizes) == 1:
        imp.emit("identity", [imp.input(0)])
        return
    outs = imp.emit("split", [imp.input(0)], {"axis": axis, "sizes": tuple(sizes)}, out=None, suffix="split")
    for i, o in enumerate(outs):
        imp.alias(i, o)


@converts("Slice")
def _slice(imp: _Importer, n: OnnxNode) -> None:
    """One IR slice per non-trivial axis, with clamped Python-style bounds."""
    shape = list(imp.shape(0))
    steps = [(axis, sl.indices(shape[axis])) for axis, sl in _slice_specs(imp, n, tuple(shape))]
    todo = [(a, s, e, k) for a, (s, e, k) in steps if not (s == 0 and e == shape[a] and k == 1)]
    for a, s, e, k in todo:
        if k < 0:
            raise imp.error(f"negative slice step {k} (a flip) has no IR op")
    if not todo:
        imp.emit("identity", [imp.input(0)])
        return
    cur = imp.input(0)
    for j, (a, s, e, k) in enumerate(todo):
        e = max(e, s)
        last = j == len(todo) - 1
        (cur,) = imp.emit("slice", [cur], {"axis": a, "start": s, "end": e, "step": k},
                          out=0 if last else None, suffix=f"slice{a}")


@converts("Gather")
def _gather(imp: _Importer, n: OnnxNode) -> None:
    """Constant indices forming a range are a slice (plus a reshape to the index shape)."""
    shape = imp.shape(0)
    axis = _norm_axes(imp, [int(n.attr("axis", 0))], len(shape))[0]
    idx = _gather_index(imp, imp.const(1, "indices"), shape[axis])
    flat = idx.reshape(-1)
    step = int(flat[1] - flat[0]) if flat.size > 1 else 1
    if flat.size == 0 or step <= 0 or not np.array_equal(flat, flat[0] + step * np.arange(flat.size)):
        raise imp.error(f"gathering a run-time tensor at indices {flat.tolist()[:8]} has no IR op; only indices "
                        f"forming an increasing arithmetic range (any index shape) are supported.")
    start, end = int(flat[0]), int(flat[-1]) + 1
    out_shape = shape[:axis] + tuple(idx.shape) + shape[axis + 1:]
    sliced = shape[:axis] + (flat.size,) + shape[axis + 1:]
    full = start == 0 and step == 1 and end == shape[axis]
    reshape = out_shape != sliced
    cur = imp.input(0)
    if not full:
        (cur,) = imp.emit("slice", [cur], {"axis": axis, "start": start, "end": end, "step": step},
                          out=None if reshape else 0, suffix="slice")
    if reshape:
        imp.emit("reshape", [cur], {"shape": out_shape})
    elif full:
        imp.emit("identity", [cur])


@converts("Pad")
def _pad(imp: _Importer, n: OnnxNode) -> None:
    shape = imp.shape(0)
    rank = len(shape)
    mode = n.attr("mode", "constant")
    if imp.opset >= 11:
        pads = _ints(imp.const(1, "pads"))
        cv = imp.opt_const(2, "constant_value")
        value = 0.0 if cv is None else float(np.asarray(cv).reshape(-1)[0])
        axes_arr = imp.opt_const(3, "axes")
        if axes_arr is not None:
            axes = _norm_axes(imp, _ints(axes_arr), rank)
            full = [0] * (2 * rank)
            for j, a in enumerate(axes):
                full[a], full[a + rank] = pads[j], pads[j + len(axes)]
            pads = full
    else:
        pads, value = _ints(n.attr("pads")), float(n.attr("value", 0.0))
    if mode not in ("constant", "reflect", "edge"):
        raise imp.error(f"pad mode {mode!r} has no IR equivalent (constant, reflect, edge)")
    if len(pads) != 2 * rank or any(p < 0 for p in pads):
        raise imp.error(f"pads {pads} must be {2 * rank} non-negative values (cropping pads are not supported)")
    imp.emit("pad", [imp.input(0)], {"pads": tuple(pads), "mode": mode, "value": value})


# ---- converters: compute ops ----------------------------------------------------------------------

_SIMPLE_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "HardSwish": "hardswish",
                 "Exp": "exp", "Sqrt": "sqrt", "Neg": "neg"}


@converts(*_SIMPLE_UNARY)
def _unary(imp: _Importer, n: OnnxNode) -> None:
    imp.emit(_SIMPLE_UNARY[n.op_type], [imp.input(0)])


@converts("HardSigmoid")
def _hardsigmoid(imp: _Importer, n: OnnxNode) -> None:
    imp.emit("hardsigmoid", [imp.input(0)], {"alpha": float(n.attr("alpha", 0.2)),
                                             "beta": float(n.attr("beta", 0.5))})


@converts("Gelu")
def _gelu(imp: _Importer, n: OnnxNode) -> None:
    imp.emit("gelu", [imp.input(0)], {"approximate": n.attr("approximate", "none")})


@converts("Clip")
def _clip(imp: _Importer, n: OnnxNode) -> None:
    """Bounds from attributes (< 11) or inputs; (0, 6) and (0, inf) are the named activations passes match."""
    if imp.opset >= 11:
        lo, hi = _bound(imp.opt_const(1, "min")), _bound(imp.opt_const(2, "max"))
    else:
        lo, hi = _bound(n.attr("min")), _bound(n.attr("max"))
    x = imp.input(0)
    if lo == 0.0 and hi == 6.0:
        imp.emit("relu6", [x])
    elif lo == 0.0 and hi is None:
        imp.emit("relu", [x])
    elif lo is None and hi is None:
        imp.emit("identity", [x])
    else:
        imp.emit("clip", [x], {"min": lo, "max": hi})


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow"}


@converts(*_BINARY)
def _binary(imp: _Importer, n: OnnxNode) -> None:
    """Constant operands become parameters cast to the run-time operand's type (IR binaries need one dtype)."""
    a, b = n.inputs[0], n.inputs[1]
    dyn = a if not imp.is_const(a) else b
    dtype = imp.type_of(dyn).dtype
    imp.emit(_BINARY[n.op_type], [imp.value(a, dtype), imp.value(b, dtype)])


@converts("Sum")
def _sum(imp: _Importer, n: OnnxNode) -> None:
    present = [x for x in n.inputs if x]
    dtype = next(imp.type_of(x).dtype for x in present if not imp.is_const(x))
    if len(present) == 1:
        imp.alias(0, imp.value(present[0]))
        return
    cur = imp.value(present[0], dtype)
    for j, x in enumerate(present[1:], start=1):
        (cur,) = imp.emit("add", [cur, imp.value(x, dtype)], out=0 if j == len(present) - 1 else None,
                          suffix=f"sum{j}")


@converts("Reciprocal")
def _reciprocal(imp: _Importer, n: OnnxNode) -> None:
    one = imp.param(f"{n.outputs[0]}.one", np.ones((), dtype=imp.dtype(0)))
    imp.emit("div", [one, imp.input(0)])


@converts("Softmax")
def _softmax(imp: _Importer, n: OnnxNode) -> None:
    """Before opset 13 Softmax normalizes over all dims from axis on (2-D coercion)."""
    shape = imp.shape(0)
    rank = len(shape)
    axis = int(n.attr("axis", -1 if imp.opset >= 13 else 1)) % rank
    if imp.opset >= 13 or axis == rank - 1:
        imp.emit("softmax", [imp.input(0)], {"axis": axis})
        return
    # opset < 13 coerces to 2-D [prod(d<axis), prod(d>=axis)] and normalizes over the second dim
    (flat,) = imp.emit("reshape", [imp.input(0)], {"shape": (math.prod(shape[:axis]), math.prod(shape[axis:]))},
                       out=None, suffix="2d")
    (sm,) = imp.emit("softmax", [flat], {"axis": 1}, out=None)
    imp.emit("reshape", [sm], {"shape": shape})


@converts("Conv")
def _conv(imp: _Importer, n: OnnxNode) -> None:
    """ONNX 2-D pads [x1_begin, x2_begin, x1_end, x2_end] are already IR [top, left, bottom, right]."""
    x_shape = _need_rank(imp, 0, 4, "2-D (NCHW)")
    w_shape = imp.shape(1)
    strides = _ints(n.attr("strides", [1, 1]))
    dil = _ints(n.attr("dilations", [1, 1]))
    kernel = _ints(n.attr("kernel_shape", w_shape[2:]))
    pads = _spatial_pads(imp, n, x_shape[2:], kernel, strides, dil)
    dtype = imp.dtype(0)
    ins = [imp.input(0), imp.input(1, dtype)] + ([imp.input(2, dtype)] if n.has_input(2) else [])
    imp.emit("conv2d", ins, {"stride": tuple(strides), "padding": pads, "dilation": tuple(dil),
                             "groups": int(n.attr("group", 1))})


def _pool_common(imp: _Importer, n: OnnxNode) -> dict[str, Any]:
    x_shape = _need_rank(imp, 0, 4, "2-D (NCHW)")
    kernel = _ints(n.attr("kernel_shape"))
    strides = _ints(n.attr("strides", [1, 1]))
    dil = _ints(n.attr("dilations", [1, 1]))
    pads = _spatial_pads(imp, n, x_shape[2:], kernel, strides, dil)
    return {"kernel": tuple(kernel), "stride": tuple(strides), "padding": pads,
            "ceil_mode": bool(n.attr("ceil_mode", 0)), "dilation": tuple(dil)}


@converts("MaxPool")
def _maxpool(imp: _Importer, n: OnnxNode) -> None:
    imp.check_unused_outputs(1, "argmax indices")
    imp.emit("max_pool2d", [imp.input(0)], _pool_common(imp, n))


@converts("AveragePool")
def _avgpool(imp: _Importer, n: OnnxNode) -> None:
    a = _pool_common(imp, n)
    if a.pop("dilation") != (1, 1):
        raise imp.error("dilated average pooling has no IR equivalent")
    imp.emit("avg_pool2d", [imp.input(0)], {**a, "count_include_pad": bool(n.attr("count_include_pad", 0))})


@converts("GlobalAveragePool")
def _gap(imp: _Importer, n: OnnxNode) -> None:
    _need_rank(imp, 0, 4, "2-D (NCHW)")
    imp.emit("global_avg_pool", [imp.input(0)])


@converts("GlobalMaxPool")
def _gmp(imp: _Importer, n: OnnxNode) -> None:
    """The IR has no global max pool; a max pool over the whole (static) plane is the same."""
    s = _need_rank(imp, 0, 4, "2-D (NCHW)")
    imp.emit("max_pool2d", [imp.input(0)], {"kernel": s[2:], "stride": (1, 1)})


@converts("ReduceMean")
def _reduce_mean(imp: _Importer, n: OnnxNode) -> None:
    """A spatial keepdims mean is global_avg_pool, the form CNN passes know (dynamo exports GAP this way)."""
    shape = imp.shape(0)
    axes = _axes(imp, n, 1, 18)
    keep = bool(n.attr("keepdims", 1))
    if not axes:
        if n.attr("noop_with_empty_axes", 0):
            imp.emit("identity", [imp.input(0)])
            return
        axes = list(range(len(shape)))
    ax = sorted(set(_norm_axes(imp, axes, len(shape))))
    if keep and len(shape) == 4 and ax == [2, 3]:
        imp.emit("global_avg_pool", [imp.input(0)])
    else:
        imp.emit("mean", [imp.input(0)], {"axes": tuple(ax), "keepdims": keep})


@converts("BatchNormalization")
def _batchnorm(imp: _Importer, n: OnnxNode) -> None:
    """Inference form only: training statistics outputs cannot be used."""
    if n.attr("training_mode", 0):
        raise imp.error("training_mode=1; export the model in eval mode")
    if not n.attr("spatial", 1):
        raise imp.error("spatial=0 (per-element statistics) is not supported")
    imp.check_unused_outputs(1, "running statistics")
    dtype = imp.dtype(0)
    imp.emit("batch_norm", [imp.input(0)] + [imp.input(i, dtype) for i in range(1, 5)],
             {"eps": float(n.attr("epsilon", 1e-5))})


@converts("LayerNormalization")
def _layernorm(imp: _Importer, n: OnnxNode) -> None:
    imp.check_unused_outputs(1, "mean / inverse std-dev")
    dtype = imp.dtype(0)
    ins = [imp.input(0), imp.input(1, dtype)] + ([imp.input(2, dtype)] if n.has_input(2) else [])
    imp.emit("layer_norm", ins, {"axis": int(n.attr("axis", -1)), "eps": float(n.attr("epsilon", 1e-5))})


def _bias_vector(c: np.ndarray, out_features: int) -> np.ndarray | None:
    """Gemm's C as a [out] bias vector when it broadcasts along rows only (scalar, [N], [1, N]), else None."""
    if c.ndim <= 1 and c.size in (1, out_features) or c.ndim == 2 and c.shape[0] == 1 and c.size in (1, out_features):
        return np.broadcast_to(c.reshape(-1), (out_features,))
    return None


@converts("Gemm")
def _gemm(imp: _Importer, n: OnnxNode) -> None:
    """Constant B becomes dense with alpha folded into the [out, in] weight and row-broadcast C into the bias; a
    computed B (a QDQ model's dequantized weight) becomes dense too when alpha is 1, else matmul."""
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    trans_a, trans_b = bool(n.attr("transA", 0)), bool(n.attr("transB", 0))
    dtype = imp.dtype(0) if not imp.is_const(n.inputs[0]) else imp.dtype(1)
    has_c = n.has_input(2) and beta != 0.0
    c = imp.consts.get(n.inputs[2]) if has_c else None
    a = imp.input(0, dtype)
    if trans_a:
        (a,) = imp.emit("transpose", [a], {"perm": (1, 0)}, out=None, suffix="At")
    if imp.is_const(n.inputs[1]):
        b = imp.consts[n.inputs[1]].astype(dtype)
        w = (b if trans_b else b.T) * np.asarray(alpha, dtype)
        w_name = imp.input(1, dtype) if trans_b and alpha == 1.0 else imp.param(n.inputs[1], w)
        bias = None if c is None else _bias_vector(c, w.shape[0])
        need_add = has_c and bias is None
        ins = [a, w_name]
        if bias is not None:
            same = beta == 1.0 and c is not None and c.shape == (w.shape[0],)
            ins.append(imp.input(2, dtype) if same else imp.param(n.inputs[2], bias.astype(dtype) * beta))
        (y,) = imp.emit("dense", ins, out=None if need_add else 0, suffix="dense")
    elif alpha == 1.0:  # a computed [out, in] B (a QDQ model's dequantized weight): dense, so fold-qdq sees a layer
        b_name = imp.input(1, dtype)
        if not trans_b:
            (b_name,) = imp.emit("transpose", [b_name], {"perm": (1, 0)}, out=None, suffix="Bt")
        out_features = imp.type_of(n.inputs[1]).shape[0 if trans_b else 1]
        bias = _bias_vector(c, out_features) if c is not None and isinstance(out_features, int) else None
        need_add = has_c and bias is None
        ins = [a, b_name]
        if bias is not None:
            same = beta == 1.0 and c.shape == bias.shape
            ins.append(imp.input(2, dtype) if same else imp.param(n.inputs[2], bias.astype(dtype) * beta))
        (y,) = imp.emit("dense", ins, out=None if need_add else 0, suffix="dense")
    else:
        need_add = has_c
        b_name = imp.input(1, dtype)
        if trans_b:
            (b_name,) = imp.emit("transpose", [b_name], {"perm": (1, 0)}, out=None, suffix="Bt")
        (y,) = imp.emit("matmul", [a, b_name], out=None if need_add or alpha != 1.0 else 0, suffix="matmul")
        if alpha != 1.0:
            s = imp.param(f"{n.outputs[0]}.alpha", np.asarray(alpha, dtype))
            (y,) = imp.emit("mul", [y, s], out=None if need_add else 0, suffix="alpha")
    if not need_add:
        return
    if c is not None:
        cv = imp.input(2, dtype) if beta == 1.0 else imp.param(n.inputs[2], c.astype(dtype) * np.asarray(beta, dtype))
    else:
        cv = imp.input(2, dtype)
        if beta != 1.0:
            s = imp.param(f"{n.outputs[0]}.beta", np.asarray(beta, dtype))
            (cv,) = imp.emit("mul", [cv, s], out=None, suffix="beta")
    imp.emit("add", [y, cv])


@converts("MatMul")
def _matmul(imp: _Importer, n: OnnxNode) -> None:
    """A constant 2-D right operand is a Linear layer: dense with the transposed weight."""
    a_name, b_name = n.inputs[0], n.inputs[1]
    if imp.is_const(b_name) and imp.consts[b_name].ndim == 2 and not imp.is_const(a_name):
        dtype = imp.dtype(0)
        w = imp.param(b_name, imp.consts[b_name].T.astype(dtype))
        imp.emit("dense", [imp.input(0), w])
        return
    dyn = a_name if not imp.is_const(a_name) else b_name
    dtype = imp.type_of(dyn).dtype
    ta, tb = imp.type_of(a_name), imp.type_of(b_name)
    if ta.rank < 2 or tb.rank < 2:
        raise imp.error(f"MatMul of shapes {ta} and {tb}: 1-D operands are only supported with a constant 2-D "
                        f"right-hand side")
    imp.emit("matmul", [imp.value(a_name, dtype), imp.value(b_name, dtype)])


# ---- converters: resize ---------------------------------------------------------------------------

def _resize_out_size(imp: _Importer, n: OnnxNode, shape: Shape, scales: np.ndarray | None,
                     sizes: np.ndarray | None) -> tuple[int, int]:
    axes = n.attr("axes")
    axes = list(range(len(shape))) if axes is None else _norm_axes(imp, [int(a) for a in axes], len(shape))
    if sizes is not None and sizes.size:
        if n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise imp.error("keep_aspect_ratio_policy other than 'stretch' is not supported")
        out = list(shape)
        for a, s in zip(axes, _ints(sizes)):
            out[a] = s
    elif scales is not None and scales.size:
        out = list(shape)
        for a, s in zip(axes, np.asarray(scales, dtype=np.float64).reshape(-1)):
            exact = shape[a] * float(np.float32(s))
            out[a] = int(math.floor(exact))
            if abs(exact - round(exact)) > 1e-4:
                raise imp.error(f"scale {float(s)} gives a non-integral size {exact} on axis {a}; the IR resizes to "
                                f"sizes, so re-export with integral output sizes (or a `sizes` input)")
    else:
        raise imp.error("needs scales or sizes")
    if out[:2] != list(shape[:2]):
        raise imp.error(f"resizing batch or channel dims ({list(shape)} → {out}) is not supported")
    return out[2], out[3]


def _resize_mode(imp: _Importer, mode: str, ctm: str, nearest: str, antialias: bool, shape: Shape,
                 size: tuple[int, int]) -> dict[str, Any]:
    """IR mode/align_corners for an ONNX coordinate convention, or an error if none matches exactly."""
    if mode == "nearest":
        upscale = all(o % i == 0 for i, o in zip(shape[2:], size))
        if (ctm == "asymmetric" and nearest == "floor") or (
                upscale and ctm in ("half_pixel", "pytorch_half_pixel")
                and nearest in ("round_prefer_floor", "round_prefer_ceil")):
            return {"mode": "nearest"}
        raise imp.error(f"nearest resize with coordinate_transformation_mode={ctm!r}, nearest_mode={nearest!r} "
                        f"(from {list(shape[2:])} to {list(size)}) has no exact IR equivalent; IR nearest is "
                        f"asymmetric+floor (PyTorch's 'nearest')")
    if mode == "linear":
        if antialias and any(o < i for i, o in zip(shape[2:], size)):
            raise imp.error("antialiased downscaling is not supported")
        if ctm == "align_corners":
            return {"mode": "bilinear", "align_corners": True}
        if ctm == "half_pixel" or (ctm == "pytorch_half_pixel" and min(size) > 1):
            return {"mode": "bilinear", "align_corners": False}
        raise imp.error(f"linear resize with coordinate_transformation_mode={ctm!r} has no IR equivalent "
                        f"(supported: half_pixel, pytorch_half_pixel, align_corners)")
    raise imp.error(f"resize mode {mode!r} is not supported (nearest, linear)")


@converts("Resize")
def _resize(imp: _Importer, n: OnnxNode) -> None:
    """Accepted only where ONNX coordinates equal PyTorch's (IR resize is F.interpolate to a size)."""
    shape = _need_rank(imp, 0, 4, "NCHW")
    if imp.opset < 11:  # Resize-10: asymmetric coordinates, floor when upscaling (refused when downscaling)
        scales, sizes, ctm, nearest = imp.const(1, "scales"), None, "asymmetric", "floor"
    else:
        scales, sizes = imp.opt_const(2, "scales"), imp.opt_const(3, "sizes")
        ctm = n.attr("coordinate_transformation_mode", "half_pixel")
        nearest = n.attr("nearest_mode", "round_prefer_floor")
    size = _resize_out_size(imp, n, shape, scales, sizes)
    if imp.opset < 11 and any(o < i for i, o in zip(shape[2:], size)):
        raise imp.error(f"Resize-10 downscaling ({list(shape[2:])} → {list(size)}) rounds source pixels differently "
                        f"from IR nearest resize; re-export with opset >= 11")
    m = _resize_mode(imp, n.attr("mode", "nearest"), ctm, nearest, bool(n.attr("antialias", 0)), shape, size)
    imp.emit("resize", [imp.input(0)], {"size": size, **m})


@converts("Upsample")
def _upsample(imp: _Importer, n: OnnxNode) -> None:
    """Upsample (opsets 7-9) is asymmetric nearest, which matches IR nearest when upscaling."""
    shape = _need_rank(imp, 0, 4, "NCHW")
    scales = np.asarray(n.attr("scales")) if imp.opset < 9 else imp.const(1, "scales")
    size = _resize_out_size(imp, n, shape, scales, None)
    mode = n.attr("mode", "nearest")
    if mode != "nearest" and size != shape[2:]:
        raise imp.error(f"Upsample mode {mode!r} uses asymmetric coordinates, which IR bilinear resize does not; "
                        f"re-export with opset >= 11 (Resize)")
    imp.emit("resize", [imp.input(0)], {"size": size, "mode": "nearest"})


# ---- converters: quantization ---------------------------------------------------------------------

def _qdq_axis(imp: _Importer, n: OnnxNode, scale: np.ndarray) -> int | None:
    """The channel axis of a per-axis QuantizeLinear/DequantizeLinear, or None when its scale is a single value."""
    if int(n.attr("block_size", 0)) or scale.ndim > 1:
        raise imp.error(f"blocked quantization (scale of shape {list(scale.shape)}) has no IR equivalent; the IR "
                        f"quantizes per tensor (one scale) or per axis (a 1-D scale)")
    if scale.size == 1:
        return None
    if imp.opset < 13:
        raise imp.error(f"a 1-D scale of {scale.size} values is per-axis quantization, which ONNX defines from "
                        f"opset 13 on; convert the model to opset 13 or later")
    shape = imp.shape(0)
    axis = _norm_axes(imp, [int(n.attr("axis", 1))], len(shape))[0]
    if shape[axis] != scale.size:
        raise imp.error(f"{scale.size} scales for {shape[axis]} channels on axis {axis} of input {list(shape)}")
    return axis


def _qdq_constants(imp: _Importer, n: OnnxNode, zp_dtype: str, allowed: Sequence[str] = tuple(ops.QUANT_DTYPES)
                   ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Scale, zero point (absent: zeros of `zp_dtype`) and axis of a QuantizeLinear/DequantizeLinear, as the IR
    takes them: constant, a float32 scale, a zero point of an `allowed` type and of the scale's shape, scalars per
    tensor."""
    scale = imp.const(1, "scale")
    zp = imp.opt_const(2, "zero point")
    zp = np.zeros(scale.shape, zp_dtype) if zp is None else zp
    if scale.dtype != np.float32:
        raise imp.error(f"its scale is {scale.dtype}; the IR's quantization parameters are float32 scales")
    if str(zp.dtype) not in allowed:
        raise imp.error(f"its zero point is {zp.dtype}; the IR quantizes to {', '.join(ops.QUANT_DTYPES)} only")
    axis = _qdq_axis(imp, n, scale)
    if zp.size != scale.size or zp.ndim > 1:  # ORT accepts a [1] scale with a scalar zero point, and vice versa
        raise imp.error(f"zero point of shape {list(zp.shape)} does not match scale of shape {list(scale.shape)}")
    return (scale.reshape(()), zp.reshape(()), None) if axis is None else (scale, zp.reshape(-1), axis)


def _along_axis(arr: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """A per-axis [C] parameter shaped to broadcast along `axis` (scalars stay scalars)."""
    return arr if axis is None else arr.reshape([-1 if i == axis else 1 for i in range(rank)])


def _qdq_values(imp: _Importer, n: OnnxNode, scale: np.ndarray, zp: np.ndarray) -> list[str]:
    """IR parameters for scale and zero point, one per initializer and shape (a Q and its DQ share them); a missing
    zero point is named after the scale."""
    out = []
    for i, arr in ((1, scale), (2, zp)):
        src = n.inputs[i] if n.has_input(i) else f"{n.inputs[1]}.zero_point"
        key = (src, f"{arr.dtype}{list(arr.shape)}")
        if key not in imp.materialized:
            imp.materialized[key] = imp.param(src, arr)
        out.append(imp.materialized[key])
    return out


def _quantized_dtype(imp: _Importer, n: OnnxNode) -> str:
    """QuantizeLinear's output type when it has no zero point: output_dtype (opset 21) or, by the spec, uint8."""
    to = int(n.attr("output_dtype", 0))
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))) if to else "uint8"


@converts("QuantizeLinear")
def _quantize_linear(imp: _Importer, n: OnnxNode) -> None:
    """Constant per-tensor or per-axis parameters become the IR quantize's operands."""
    scale, zp, axis = _qdq_constants(imp, n, _quantized_dtype(imp, n))
    imp.emit("quantize", [imp.input(0), *_qdq_values(imp, n, scale, zp)], {"axis": 1 if axis is None else axis})


@folds("QuantizeLinear")
def _fold_quantize_linear(imp: _Importer, n: OnnxNode, args: list) -> list[np.ndarray]:
    """Weights quantized in the graph become int8 constants: saturate(round_half_even(x / scale) + zero_point)."""
    scale, zp, axis = _qdq_constants(imp, n, _quantized_dtype(imp, n))
    x = np.asarray(args[0]).astype(np.float32)
    lo, hi = ops.QUANT_DTYPES[str(zp.dtype)]
    q = np.rint(x / _along_axis(scale, axis, x.ndim)) + _along_axis(zp, axis, x.ndim).astype(np.float32)
    return [np.clip(q, lo, hi).astype(zp.dtype)]


@converts("DequantizeLinear")
def _dequantize_linear(imp: _Importer, n: OnnxNode) -> None:
    """uint8/int8 values (also constant weights, kept for fold-qdq) become dequantize; constant int32 biases fold."""
    x_dtype = imp.dtype(0)
    if x_dtype in ops.QUANT_DTYPES:
        scale, zp, axis = _qdq_constants(imp, n, x_dtype)
        imp.emit("dequantize", [imp.input(0), *_qdq_values(imp, n, scale, zp)], {"axis": 1 if axis is None else axis})
    elif x_dtype == "int32" and imp.is_const(n.inputs[0]):
        imp.set_const(n.outputs[0], _dequantized_int32(imp, n, imp.consts[n.inputs[0]]))
    else:
        kind = "constant" if imp.is_const(n.inputs[0]) else "run-time"
        raise imp.error(f"dequantizing a {kind} {x_dtype} tensor has no IR op; the IR dequantizes uint8/int8 values "
                        f"(and folds constant int32 ones, the quantized biases)")


def _dequantized_int32(imp: _Importer, n: OnnxNode, x: np.ndarray) -> np.ndarray:
    """A quantized int32 bias as ONNX Runtime dequantizes it: float32(x - zero_point) * scale."""
    scale, zp, axis = _qdq_constants(imp, n, "int32", allowed=("int32",))
    centered = x.astype(np.int64) - _along_axis(zp, axis, x.ndim).astype(np.int64)
    return centered.astype(np.float32) * _along_axis(scale, axis, x.ndim)
