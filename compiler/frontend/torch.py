"""torch.export frontend: nn.Module / ExportedProgram / .pt2 file -> slimc IR, through one ATen conversion table.

The module is captured with `torch.export.export` and lowered with `run_decompositions({})`, which yields a
functional, high-level ATen graph (aten.conv2d, aten.linear, aten._native_batch_norm_legit_no_training, ...).
Each fx node is then handled by exactly one of:

* placeholders: user inputs become graph inputs; parameters, buffers and lifted constants become IR
  parameters (materialized on first use, named after their module path);
* shape arithmetic (`aten.sym_size.int`, SymInt math) and runtime assertions: recorded, emit nothing;
* constant subgraphs (every tensor operand known at import time, e.g. `weight.t()` or `torch.ones(...)`):
  evaluated once with torch and stored as a parameter;
* everything else: the converter registered for its ATen overload in `CONVERTERS`, or a FrontendError.

Every converted value is checked against torch's own shape/dtype propagation (`node.meta["val"]`), so a
converter bug surfaces as an error at import instead of wrong numbers later.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from slimc import ops
from slimc.errors import FrontendError, IRError
from slimc.ir import DTYPES, Dim, Graph, Node, TensorType, sanitize_name, unique_name

aten = torch.ops.aten

#: what an fx node turns into: an IR value name, a tuple of them (multi-output; None = output slimc drops),
#: or None for nodes that emit nothing (assertions)
Value = Union[str, tuple[Union[str, None], ...], None]
Args = dict[str, Any]
Converter = Callable[["_Importer", Args], Value]

#: the conversion table: ATen overload (or operator.getitem) -> converter
CONVERTERS: dict[Any, Converter] = {}

#: runtime checks torch.export inserts; they hold for the traced shapes and emit nothing
_IGNORED = {
    aten._assert_scalar.default,
    aten._assert_tensor_metadata.default,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
    aten._assert_async.msg,
}

_SHAPE_TYPES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
_INT64_MAX = 2**63 - 1


def converts(*targets: Any) -> Callable[[Converter], Converter]:
    """Register one converter for the given ATen overloads (one table, no if/elif chains)."""

    def deco(fn: Converter) -> Converter:
        for t in targets:
            if t in CONVERTERS:
                raise ValueError(f"converter for {op_name(t)} registered twice")
            CONVERTERS[t] = fn
        return fn

    return deco


def op_name(target: Any) -> str:
    """Readable name of an fx call target: 'aten.conv2d.default', 'operator.getitem', ..."""
    if target is operator.getitem:
        return "operator.getitem"
    return str(target)


def supported_ops() -> list[str]:
    """Names of every ATen op the frontend converts (for error messages and docs)."""
    return sorted(op_name(t) for t in CONVERTERS)


# ---- public API ------------------------------------------------------------------------------------

def from_torch(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None, *,
               input_shapes: Sequence[Sequence[int]] | None = None, dynamic_batch: bool = False,
               name: str | None = None) -> Graph:
    """Capture `module` (in eval mode) with torch.export and convert it to a verified slimc Graph."""
    args = _example_args(example_inputs, input_shapes, dynamic_batch)
    module = module.eval()
    try:
        ep = torch.export.export(module, args, dynamic_shapes=_batch_dims(module, args) if dynamic_batch else None)
    except Exception as e:  # torch.export raises many unrelated types (UserError, Unsupported, GuardOnDataDependent...)
        if dynamic_batch and "onstraint" in str(e):
            hint = ("The model fixes its batch size somewhere (e.g. a view with a literal batch); import it without "
                    "dynamic_batch, or make that code use x.shape[0].")
        else:
            hint = ("slimc imports what torch.export.export(model, args) accepts: fix that (e.g. rewrite "
                    "data-dependent control flow with torch.where) or export the model to ONNX instead.")
        raise FrontendError(f"torch.export could not capture {type(module).__name__}: {_first_line(e)} "
                            f"({type(e).__name__}). {hint}") from e
    return from_exported_program(ep, name=name or type(module).__name__)


def from_exported_program(ep: ExportedProgram, name: str | None = None) -> Graph:
    """Convert a torch.export program (freshly exported or loaded from a .pt2 file) to a slimc Graph."""
    if not isinstance(ep, ExportedProgram):
        raise FrontendError(f"from_exported_program expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    try:
        ep = ep.run_decompositions({})
    except Exception as e:  # decomposition re-traces the program and can fail like export does
        raise FrontendError(f"torch could not lower the exported program to functional ATen: {_first_line(e)} "
                            f"({type(e).__name__}). Re-export the model with torch.export.export.") from e
    graph = _Importer(ep, name).run()
    try:
        graph.verify()
    except IRError as e:
        raise FrontendError(f"torch frontend produced an invalid graph (a converter bug; please file an issue): "
                            f"{e}") from e
    return graph


def load_pt2(path: str | os.PathLike[str], name: str | None = None) -> Graph:
    """Load a `.pt2` file written by torch.export.save and convert it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FrontendError(f"no such file: {path}. Pass the path of a .pt2 file written by torch.export.save.")
    try:
        ep = torch.export.load(path)
    except Exception as e:  # corrupt zip, wrong format, version skew: all mean "not a loadable .pt2"
        raise FrontendError(f"cannot read {path} as a torch.export program: {_first_line(e)} ({type(e).__name__}). "
                            "Write it with torch.export.save(torch.export.export(model, args), path).") from e
    stem = os.path.splitext(os.path.basename(path))[0]
    return from_exported_program(ep, name=name or stem)


# ---- helpers ---------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception message (torch's messages run to pages)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip().rstrip(".")
    return type(e).__name__


def _example_args(example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None,
                  input_shapes: Sequence[Sequence[int]] | None, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """The tensors to trace with; a dynamic batch is traced at batch 2 (torch.export specializes sizes 0 and 1)."""
    if example_inputs is None and input_shapes is None:
        raise FrontendError("from_torch needs example_inputs (a tuple of tensors) or input_shapes "
                            "(e.g. [(1, 3, 224, 224)]) to trace the model")
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if input_shapes is not None and [tuple(a.shape) for a in args] != [tuple(s) for s in input_shapes]:
            raise FrontendError(f"example_inputs have shapes {[tuple(a.shape) for a in args]} but input_shapes "
                                f"says {[tuple(s) for s in input_shapes]}; pass one of them")
    else:
        gen = torch.Generator().manual_seed(0)
        args = tuple(torch.randn(tuple(int(d) for d in s), generator=gen) for s in input_shapes or ())
    for a in args:
        if not isinstance(a, torch.Tensor):
            raise FrontendError(f"example inputs must be torch tensors, got {type(a).__name__}")
    if dynamic_batch:
        args = tuple(a.repeat(2, *([1] * (a.dim() - 1))) if a.dim() > 0 and a.shape[0] == 1 else a for a in args)
    return args


def _batch_dims(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    """dynamic_shapes marking dim 0 of every input as one shared Dim, whatever forward's signature (*args too)."""
    batch = torch.export.Dim("N", min=1)
    shapes = torch.export.ShapesCollection()
    for a in args:
        if a.dim() > 0:
            shapes[a] = {0: batch}
    return shapes.dynamic_shapes(module, args)


def _ir_dtype(dtype: torch.dtype) -> str:
    """The IR dtype name of a torch dtype, or a FrontendError for dtypes the IR lacks (bfloat16, complex)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES.values():
        raise FrontendError(f"tensor dtype {dtype} has no slimc IR equivalent; supported: {', '.join(DTYPES.values())}")
    return name


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    _ir_dtype(t.dtype)
    return t.detach().cpu().contiguous().numpy().copy()


def _bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Args:
    """Arguments by schema name with defaults filled, so converters read a["weight"], not args[1]."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {"args": args, **kwargs}
    out: Args = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out[arg.name] = args[i]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def user_frame(node: fx.Node) -> str | None:
    """The user-code line an fx node came from: the deepest stack frame outside torch itself."""
    frames = _FRAME_RE.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return None
    outside = [f for f in frames if f"{os.sep}torch{os.sep}" not in f[0]]
    path, line, fn, code = (outside or frames)[-1]
    return f'File "{path}", line {line}, in {fn}: {code.strip()}'


def module_path(node: fx.Node) -> tuple[str, str] | None:
    """(dotted nn.Module path, class name) of the innermost module an fx node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    return path, str(cls if isinstance(cls, str) else getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]


def describe(node: fx.Node) -> str:
    """'fx node 'x' in module 'a.b' (Conv2d), at File ...' for error messages."""
    parts = [f"fx node '{node.name}'"]
    mod = module_path(node)
    if mod and mod[0]:
        parts.append(f"in module '{mod[0]}' ({mod[1]})")
    elif mod:
        parts.append(f"in the top-level module ({mod[1]})")
    frame = user_frame(node)
    if frame:
        parts.append(f"at {frame}")
    return " ".join(parts)


#: fx names that spell out ATen internals, and the IR-level names used instead
_NAME_PREFIXES = (("_native_batch_norm_legit_no_training", "batch_norm"), ("native_layer_norm", "layer_norm"),
                  ("max_pool2d_with_indices", "max_pool2d"), ("_adaptive_avg_pool2d", "adaptive_avg_pool2d"),
                  ("upsample_nearest2d", "resize"), ("upsample_bilinear2d", "resize"))


def readable_name(fx_name: str) -> str:
    """IR node name for an fx node: '_native_batch_norm_legit_no_training_3' reads as 'batch_norm_3'."""
    for old, new in _NAME_PREFIXES:
        if fx_name.startswith(old):
            fx_name = new + fx_name[len(old):]
            break
    return sanitize_name(fx_name.lstrip("_") or fx_name)


def _ints(v: Any, n: int) -> tuple[int, ...]:
    """An int or a list of 1 or n ints as a tuple of n ints (torch lets `stride=2` mean (2, 2))."""
    vals = [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise FrontendError(f"expected {n} values, got {vals}")
    return tuple(vals)


# ---- the importer ----------------------------------------------------------------------------------

class _Importer:
    """Walks an ExportedProgram's fx graph in order and builds the IR (state of one conversion)."""

    def __init__(self, ep: ExportedProgram, name: str | None) -> None:
        self.ep = ep
        self.name = sanitize_name(name or self._root_class() or "model")
        self.env: dict[fx.Node, Any] = {}
        self.consts: dict[fx.Node, Any] = {}
        self.const_names: dict[fx.Node, str] = {}
        self.materialized: dict[fx.Node, str] = {}
        self.types: dict[str, TensorType] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.inputs: list[tuple[str, TensorType]] = []
        self.nodes: list[Node] = []
        self.taken: set[str] = set()
        self.symbols: dict[str, str] = {}
        self.node: fx.Node | None = None

    def _root_class(self) -> str | None:
        for n in self.ep.graph.nodes:
            stack = n.meta.get("nn_module_stack")
            if stack:
                cls = list(stack.values())[0][1]
                return str(cls if isinstance(cls, str) else getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
        return None

    # -- driver --
    def run(self) -> Graph:
        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        outputs: list[str] = []
        for node in self.ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self._placeholder(node, specs.get(node.name))
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                outputs = self._outputs(node)
            else:
                raise FrontendError(f"torch frontend: {describe(node)} is a '{node.op}' node ({node.target}); "
                                    "slimc imports flat ATen graphs without submodule calls or control flow. "
                                    "Rewrite the construct with tensor ops (e.g. torch.where) or file an issue.")
        self.node = None
        return Graph.from_weights(self.name, self.inputs, outputs, self.nodes, self.weights)

    def _placeholder(self, node: fx.Node, spec: Any) -> None:
        if spec is None or spec.kind == InputKind.USER_INPUT:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise FrontendError(f"torch frontend: graph input '{node.name}' is a {type(val).__name__}, not a "
                                    "tensor; slimc graphs take tensor inputs only")
            dims = tuple(self._dim(d, i, assign=True) for i, d in enumerate(val.shape))
            name = self.fresh(node.name)
            t = TensorType(dims, _ir_dtype(val.dtype))  # type: ignore[arg-type]
            self.inputs.append((name, t))
            self.types[name] = t
            self.env[node] = name
            return
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = self.ep.state_dict.get(spec.target)
            if value is None:
                value = self.ep.constants.get(spec.target)
            if not isinstance(value, torch.Tensor):
                raise FrontendError(f"torch frontend: {spec.kind.name.lower()} '{spec.target}' has no tensor data "
                                    f"in the exported program (got {type(value).__name__})")
            self.consts[node] = value.detach()
            self.const_names[node] = spec.target
            return
        raise FrontendError(f"torch frontend: graph input '{node.name}' is a {spec.kind.name} ({spec.target}); "
                            "slimc imports tensors, parameters, buffers and constants only")

    def _call(self, node: fx.Node) -> None:
        target = node.target
        if target in _IGNORED:
            self.env[node] = None
            return
        val = node.meta.get("val")
        if isinstance(val, _SHAPE_TYPES):
            self.env[node] = val
            return
        if self._foldable(node):
            self.consts[node] = self._fold(node)
            return
        conv = CONVERTERS.get(target)
        if conv is None:
            raise self._unsupported(node)
        try:
            result = conv(self, _bind(target, node.args, node.kwargs))
        except (FrontendError, IRError, ValueError, TypeError, IndexError, KeyError) as e:
            raise FrontendError(f"torch frontend: cannot convert {op_name(target)} at {describe(node)}: {e}") from e
        self.env[node] = result
        self._check_against_meta(node, result)

    def _outputs(self, node: fx.Node) -> list[str]:
        outs = node.args[0]
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        specs = self.ep.graph_signature.output_specs
        names: list[str] = []
        for spec, o in zip(specs, outs):
            if spec.kind != OutputKind.USER_OUTPUT:
                raise FrontendError(f"torch frontend: the model's forward updates state ({spec.kind.name} of "
                                    f"'{spec.target}'); slimc imports pure inference graphs. Call .eval() and "
                                    "remove in-place buffer updates from forward.")
            if not isinstance(o, fx.Node):
                raise FrontendError(f"torch frontend: model output {o!r} is not a tensor; return tensors only")
            self.node = o
            names.append(self.value(o))
        return names

    def _unsupported(self, node: fx.Node) -> FrontendError:
        return FrontendError(
            f"torch frontend: no conversion rule for ATen op {op_name(node.target)} ({describe(node)}). "
            "Replace that call in the model with supported operations, or file an issue (new rules go in "
            "slimc.frontend.torch.CONVERTERS, mapping onto the IR ops of slimc.ops). "
            f"Supported ATen ops: {', '.join(supported_ops())}.")

    # -- constant folding --
    def _foldable(self, node: fx.Node) -> bool:
        """True if every tensor operand is known at import time and the op is deterministic."""
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags:
            return False
        return all(n in self.consts for n in node.all_input_nodes)

    def _fold(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, lambda n: self.consts[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.consts[n])
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except Exception as e:  # the op itself failed on real data
            raise FrontendError(f"torch frontend: evaluating the constant subexpression {op_name(node.target)} at "
                                f"{describe(node)} failed: {_first_line(e)}") from e
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        if not all(isinstance(t, torch.Tensor) or t is None for t in leaves):
            raise FrontendError(f"torch frontend: constant subexpression {op_name(node.target)} at {describe(node)} "
                                f"gives a {type(out).__name__}, not tensors")
        return out

    # -- values --
    def fresh(self, base: str) -> str:
        """A unique, sanitized IR name."""
        name = unique_name(sanitize_name(base), self.taken)
        self.taken.add(name)
        return name

    def param(self, base: str, array: np.ndarray) -> str:
        """Add a weight and return its IR value name."""
        name = self.fresh(base)
        self.weights[name] = array
        self.types[name] = TensorType.of(array)
        return name

    def const(self, arg: Any) -> torch.Tensor | None:
        """The import-time value of an operand, or None if it is computed from the inputs."""
        if isinstance(arg, fx.Node) and arg in self.consts and isinstance(self.consts[arg], torch.Tensor):
            return self.consts[arg]
        return None

    def value(self, arg: Any, like: Any = None, slot: str = "const") -> str:
        """The IR value for an operand; constants become parameters, Python scalars 0-d ones named NODE.SLOT."""
        if isinstance(arg, fx.Node):
            if arg in self.consts:
                if arg not in self.materialized:
                    c = self.consts[arg]
                    if not isinstance(c, torch.Tensor):
                        raise FrontendError(f"constant '{arg.name}' is a {type(c).__name__}, not a tensor")
                    self.materialized[arg] = self.param(self.const_names.get(arg, arg.name), _to_numpy(c))
                return self.materialized[arg]
            v = self.env.get(arg)
            if isinstance(v, str):
                return v
            raise FrontendError(f"operand '{arg.name}' ({op_name(arg.target)}) is not a single tensor "
                                f"(got {type(v).__name__}); slimc cannot use it as a tensor operand here")
        if isinstance(arg, (int, float, bool)) and not isinstance(arg, torch.SymInt):
            dtype = self.type(like).dtype if like is not None else "float32"
            if isinstance(arg, float) and not np.issubdtype(np.dtype(dtype), np.floating):
                dtype = "float32"  # int tensor op float scalar: the IR op then reports the dtype mismatch
            return self.param(f"{self.cur}.{slot}", np.asarray(arg, dtype=dtype))
        raise FrontendError(f"operand {arg!r} ({type(arg).__name__}) is not a tensor or scalar")

    def type(self, arg: Any) -> TensorType:
        """IR type of an operand (fx node or IR value name)."""
        if isinstance(arg, str):
            return self.types[arg]
        return self.types[self.value(arg)]

    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node)

    @property
    def cur(self) -> str:
        """Readable name of the fx node being converted (base for the names it emits)."""
        return readable_name(self.node.name) if self.node is not None else "v"

    def source(self) -> tuple[str, ...]:
        """Provenance of emitted nodes: the fx node name and its nn.Module path."""
        if self.node is None:
            return ()
        mod = module_path(self.node)
        return (self.node.name, mod[0]) if mod and mod[0] else (self.node.name,)

    def emit(self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None, suffix: str = "") -> Any:
        """Append an IR node named after the current fx node (plus suffix for helper nodes); return its output(s)."""
        name = self.fresh(f"{self.cur}.{suffix}" if suffix else self.cur)
        node = ops.make_node(name, op, inputs, [self.types[i] for i in inputs], attrs or {}, self.source())
        self.nodes.append(node)
        for o, t in zip(node.outputs, node.out_types):
            self.types[o] = t
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    # -- shapes --
    def _dim(self, d: Any, index: int, assign: bool = False) -> Dim | None:
        """An IR dim for a torch size: int, a symbol name ('N' for a dynamic batch), or None if not a symbol."""
        if isinstance(d, int):
            return d
        expr = d.node.expr
        if expr.is_number:
            return int(expr)
        key = str(expr)
        if key not in self.symbols and assign:
            used = set(self.symbols.values())
            self.symbols[key] = "N" if index == 0 and "N" not in used else sanitize_name(key)
        return self.symbols.get(key)

    def meta_shape(self, val: Any = None) -> tuple[Dim | None, ...]:
        """The output shape torch computed for the current node, in IR dims (None for unknown expressions)."""
        val = self.node.meta.get("val") if val is None else val
        if not isinstance(val, torch.Tensor):
            raise FrontendError(f"no shape information for {self.cur}")
        return tuple(self._dim(d, i) for i, d in enumerate(val.shape))

    def static(self, v: Any) -> int:
        """A shape argument that must be a concrete int at import time."""
        if isinstance(v, fx.Node):
            v = self.env.get(v)
        if isinstance(v, torch.SymInt):
            expr = v.node.expr
            if not expr.is_number:
                raise FrontendError(f"{self.cur}: needs a static size but got the symbolic {expr}")
            return int(expr)
        return int(v)

    def _check_against_meta(self, node: fx.Node, result: Value) -> None:
        """Compare converted types with torch's own shape propagation; a mismatch is a converter bug."""
        val = node.meta.get("val")
        if isinstance(result, str):
            pairs = [(result, val)]
        elif isinstance(result, tuple) and isinstance(val, (list, tuple)):
            pairs = list(zip(result, val))
        else:
            return
        for name, v in pairs:
            if not isinstance(name, str) or not isinstance(v, torch.Tensor):
                continue
            got = self.types[name]
            want = self.meta_shape(v)
            same = len(got.shape) == len(want) and all(w is None or w == g for g, w in zip(got.shape, want))
            if not same or got.dtype != _ir_dtype(v.dtype):
                raise FrontendError(
                    f"torch frontend: converting {op_name(node.target)} at {describe(node)} gave {got} but torch "
                    f"computes {_ir_dtype(v.dtype)}{list(want)}; this is a converter bug, please file an issue")


# ---- converters: convolution, linear, normalization ------------------------------------------------

def _conv(cx: _Importer, x: Any, w: Any, b: Any, stride: Any, pad4: tuple[int, ...], dilation: Any,
          groups: int) -> str:
    ins = [cx.value(x), cx.value(w)] + ([cx.value(b)] if b is not None else [])
    return cx.emit("conv2d", ins, {"stride": _ints(stride, 2), "padding": pad4, "dilation": _ints(dilation, 2),
                                   "groups": int(groups)})


def _sym_pad(padding: Any) -> tuple[int, ...]:
    ph, pw = _ints(padding, 2)
    return (ph, pw, ph, pw)


@converts(aten.conv2d.default)
def _conv2d(cx: _Importer, a: Args) -> Value:
    return _conv(cx, a["input"], a["weight"], a["bias"], a["stride"], _sym_pad(a["padding"]), a["dilation"],
                 a["groups"])


@converts(aten.conv2d.padding)
def _conv2d_str_padding(cx: _Importer, a: Args) -> Value:
    """padding='valid' | 'same'; torch puts the odd extra pixel of 'same' at the bottom/right."""
    dil = _ints(a["dilation"], 2)
    if a["padding"] == "valid":
        pad4 = (0, 0, 0, 0)
    else:
        kh, kw = (int(k) for k in cx.type(a["weight"]).shape[2:])
        th, tw = dil[0] * (kh - 1), dil[1] * (kw - 1)
        pad4 = (th // 2, tw // 2, th - th // 2, tw - tw // 2)
    return _conv(cx, a["input"], a["weight"], a["bias"], a["stride"], pad4, dil, a["groups"])


@converts(aten.convolution.default)
def _convolution(cx: _Importer, a: Args) -> Value:
    if a["transposed"]:
        raise FrontendError("transposed convolution (ConvTranspose2d) has no slimc IR op")
    if len(a["stride"]) != 2:
        raise FrontendError(f"only 2-D convolutions are supported, this one has {len(a['stride'])} spatial dims")
    return _conv(cx, a["input"], a["weight"], a["bias"], a["stride"], _sym_pad(a["padding"]), a["dilation"],
                 a["groups"])


@converts(aten.linear.default)
def _linear(cx: _Importer, a: Args) -> Value:
    ins = [cx.value(a["input"]), cx.value(a["weight"])] + ([cx.value(a["bias"])] if a["bias"] is not None else [])
    return cx.emit("dense", ins)


def _matmul_or_dense(cx: _Importer, x: Any, y: Any, suffix: str = "") -> str:
    """x @ y; a constant 2-D y becomes a dense layer (weight y.T), which passes can fold, prune and quantize."""
    c = cx.const(y)
    if c is not None and c.dim() == 2 and cx.type(x).rank >= 2:
        w = cx.param(f"{sanitize_name(cx.const_names.get(y, y.name))}.T", _to_numpy(c.t()))
        return cx.emit("dense", [cx.value(x), w], suffix=suffix)
    return cx.emit("matmul", [cx.value(x), cx.value(y)], suffix=suffix)


@converts(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(cx: _Importer, a: Args) -> Value:
    return _matmul_or_dense(cx, a["self"], a["other"] if "other" in a else a["mat2"])


@converts(aten.addmm.default)
def _addmm(cx: _Importer, a: Args) -> Value:
    """beta*bias + alpha*(mat1 @ mat2): core ATen's form of nn.Linear."""
    bias, beta, alpha = a["self"], float(a["beta"]), float(a["alpha"])
    c, cb = cx.const(a["mat2"]), cx.const(bias)
    if c is not None and cb is not None and c.dim() == 2 and cb.dim() == 1 and beta == 1.0 and alpha == 1.0:
        w = cx.param(f"{sanitize_name(cx.const_names.get(a['mat2'], a['mat2'].name))}.T", _to_numpy(c.t()))
        return cx.emit("dense", [cx.value(a["mat1"]), w, cx.value(bias)])
    prod = _matmul_or_dense(cx, a["mat1"], a["mat2"], suffix="mm")
    if alpha != 1.0:
        prod = cx.emit("mul", [prod, cx.value(alpha, like=prod, slot="alpha")], suffix="alpha")
    b = cx.value(bias, like=prod, slot="bias")
    if beta != 1.0:
        b = cx.emit("mul", [b, cx.value(beta, like=prod, slot="beta")], suffix="beta")
    return cx.emit("add", [prod, b])


def _batch_norm(cx: _Importer, x: Any, w: Any, b: Any, mean: Any, var: Any, eps: float) -> str:
    xv = cx.value(x)
    c = cx.type(xv).shape[1]
    if not isinstance(c, int):
        raise FrontendError("batch norm over a symbolic channel count")
    dtype = cx.type(xv).dtype
    scale = cx.value(w) if w is not None else cx.param(f"{cx.cur}.scale", np.ones(c, dtype))
    bias = cx.value(b) if b is not None else cx.param(f"{cx.cur}.bias", np.zeros(c, dtype))
    return cx.emit("batch_norm", [xv, scale, bias, cx.value(mean), cx.value(var)], {"eps": float(eps)})


@converts(aten._native_batch_norm_legit_no_training.default)
def _bn_no_training(cx: _Importer, a: Args) -> Value:
    out = _batch_norm(cx, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"])
    return (out, None, None)


@converts(aten.batch_norm.default)
def _bn(cx: _Importer, a: Args) -> Value:
    if a["training"]:
        raise FrontendError("batch norm in training mode (batch statistics); call model.eval() before importing")
    return _batch_norm(cx, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"])


def _layer_norm(cx: _Importer, a: Args) -> str:
    xv = cx.value(a["input"])
    t = cx.type(xv)
    norm_shape = tuple(int(d) for d in a["normalized_shape"])
    ins = [xv]
    if a["weight"] is not None or a["bias"] is not None:
        ins.append(cx.value(a["weight"]) if a["weight"] is not None
                   else cx.param(f"{cx.cur}.scale", np.ones(norm_shape, t.dtype)))
    if a["bias"] is not None:
        ins.append(cx.value(a["bias"]))
    return cx.emit("layer_norm", ins, {"axis": t.rank - len(norm_shape), "eps": float(a["eps"])})


@converts(aten.layer_norm.default)
def _layer_norm_op(cx: _Importer, a: Args) -> Value:
    return _layer_norm(cx, a)


@converts(aten.native_layer_norm.default)
def _native_layer_norm(cx: _Importer, a: Args) -> Value:
    return (_layer_norm(cx, a), None, None)


# ---- converters: activations and elementwise -------------------------------------------------------

def _unary(op: str) -> Converter:
    def convert(cx: _Importer, a: Args) -> Value:
        return cx.emit(op, [cx.value(a["self"])])

    convert.__doc__ = f"One-to-one onto IR {op}."
    return convert


for _target, _op in {
    aten.relu.default: "relu", aten.relu6.default: "relu6", aten.sigmoid.default: "sigmoid",
    aten.silu.default: "silu", aten.hardswish.default: "hardswish", aten.hardsigmoid.default: "hardsigmoid",
    aten.tanh.default: "tanh", aten.exp.default: "exp", aten.sqrt.default: "sqrt", aten.neg.default: "neg",
    aten.erf.default: "erf",
}.items():
    converts(_target)(_unary(_op))


@converts(aten.gelu.default)
def _gelu(cx: _Importer, a: Args) -> Value:
    return cx.emit("gelu", [cx.value(a["self"])], {"approximate": a["approximate"] or "none"})


def _clip(cx: _Importer, x: Any, lo: float | None, hi: float | None) -> str:
    """Bounds onto the most specific IR op: relu6 for [0, 6], relu for [0, inf), clip otherwise."""
    xv = cx.value(x)
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo == 0.0 and hi == 6.0:
        return cx.emit("relu6", [xv])
    if lo == 0.0 and hi is None:
        return cx.emit("relu", [xv])
    return cx.emit("clip", [xv], {"min": lo, "max": hi})


@converts(aten.hardtanh.default)
def _hardtanh(cx: _Importer, a: Args) -> Value:
    return _clip(cx, a["self"], a["min_val"], a["max_val"])


@converts(aten.clamp.default)
def _clamp(cx: _Importer, a: Args) -> Value:
    return _clip(cx, a["self"], a["min"], a["max"])


@converts(aten.clamp_min.default)
def _clamp_min(cx: _Importer, a: Args) -> Value:
    return _clip(cx, a["self"], a["min"], None)


@converts(aten.clamp_max.default)
def _clamp_max(cx: _Importer, a: Args) -> Value:
    return _clip(cx, a["self"], None, a["max"])


@converts(aten.leaky_relu.default)
def _leaky_relu(cx: _Importer, a: Args) -> Value:
    """No IR op: relu((1-s)*x) + s*x, exact for any slope s."""
    xv, s = cx.value(a["self"]), float(a["negative_slope"])
    sx = cx.emit("mul", [xv, cx.value(s, like=xv, slot="slope")], suffix="scaled")
    pos = cx.emit("relu", [cx.emit("sub", [xv, sx], suffix="rest")], suffix="pos")
    return cx.emit("add", [pos, sx])


def _binary(cx: _Importer, op: str, x: Any, y: Any, xslot: str = "self", yslot: str = "other") -> str:
    """Elementwise op on fx nodes, IR value names or Python scalars (scalars become 0-d parameters)."""
    xv = x if isinstance(x, str) else cx.value(x) if cx.is_tensor(x) else None
    yv = y if isinstance(y, str) else cx.value(y) if cx.is_tensor(y) else None
    if xv is None and yv is None:
        raise FrontendError(f"{op} of two scalars has no tensor operand")
    xv = xv or cx.value(x, like=yv, slot=xslot)
    yv = yv or cx.value(y, like=xv, slot=yslot)
    return cx.emit(op, [xv, yv])


def _scaled(cx: _Importer, y: Any, alpha: Any) -> Any:
    """alpha * y for add/sub/rsub's alpha argument (folded into y when y is a scalar)."""
    if alpha is None or float(alpha) == 1.0:
        return y
    if not cx.is_tensor(y):
        return y * alpha
    yv = cx.value(y)
    return cx.emit("mul", [yv, cx.value(float(alpha), like=yv, slot="alpha")], suffix="alpha")


@converts(aten.add.Tensor, aten.add.Scalar)
def _add(cx: _Importer, a: Args) -> Value:
    return _binary(cx, "add", a["self"], _scaled(cx, a["other"], a["alpha"]))


@converts(aten.sub.Tensor, aten.sub.Scalar)
def _sub(cx: _Importer, a: Args) -> Value:
    return _binary(cx, "sub", a["self"], _scaled(cx, a["other"], a["alpha"]))


@converts(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(cx: _Importer, a: Args) -> Value:
    """other - alpha * self."""
    return _binary(cx, "sub", a["other"], _scaled(cx, a["self"], a["alpha"]),
                   xslot="other", yslot="self")


@converts(aten.mul.Tensor, aten.mul.Scalar)
def _mul(cx: _Importer, a: Args) -> Value:
    return _binary(cx, "mul", a["self"], a["other"])


@converts(aten.div.Tensor, aten.div.Scalar)
def _div(cx: _Importer, a: Args) -> Value:
    return _binary(cx, "div", a["self"], a["other"])


@converts(aten.div.Tensor_mode)
def _div_mode(cx: _Importer, a: Args) -> Value:
    if a["rounding_mode"] is not None:
        raise FrontendError(f"division with rounding_mode={a['rounding_mode']!r} has no slimc IR op")
    return _binary(cx, "div", a["self"], a["other"])


@converts(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
def _pow(cx: _Importer, a: Args) -> Value:
    return _binary(cx, "pow", a["self"], a["exponent"], yslot="exponent")


@converts(aten.pow.Scalar)
def _pow_scalar_base(cx: _Importer, a: Args) -> Value:
    return _binary(cx, "pow", a["self"], a["exponent"], yslot="exponent")


@converts(aten.rsqrt.default)
def _rsqrt(cx: _Importer, a: Args) -> Value:
    xv = cx.value(a["self"])
    return cx.emit("pow", [xv, cx.value(-0.5, like=xv, slot="exponent")])


@converts(aten.reciprocal.default)
def _reciprocal(cx: _Importer, a: Args) -> Value:
    xv = cx.value(a["self"])
    return cx.emit("div", [cx.value(1.0, like=xv, slot="one"), xv])


@converts(aten.softmax.int, aten._softmax.default)
def _softmax(cx: _Importer, a: Args) -> Value:
    xv = cx.value(a["self"])
    return cx.emit("softmax", [xv], {"axis": int(a["dim"]) % max(cx.type(xv).rank, 1)})


# ---- converters: identities ------------------------------------------------------------------------

def _identity(cx: _Importer, x: Any) -> str:
    return cx.emit("identity", [cx.value(x)])


@converts(aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
          aten.lift_fresh_copy.default)
def _copy(cx: _Importer, a: Args) -> Value:
    """Copies and views without data change; canonicalize removes the identity."""
    return _identity(cx, a["self"])


@converts(aten.dropout.default)
def _dropout(cx: _Importer, a: Args) -> Value:
    if a["train"]:
        raise FrontendError("dropout in training mode; call model.eval() before importing")
    return _identity(cx, a["input"])


@converts(aten._to_copy.default, aten.to.dtype)
def _to_copy(cx: _Importer, a: Args) -> Value:
    """Device/layout copies are identities; a dtype change is not (the IR has no cast op)."""
    x = a["self"]
    want = a.get("dtype")
    if want is not None and _ir_dtype(want) != cx.type(x).dtype:
        raise FrontendError(f"dtype conversion {cx.type(x).dtype} -> {_ir_dtype(want)} has no slimc IR op")
    return _identity(cx, x)


# ---- converters: shape and data movement -----------------------------------------------------------

def _reshape_to_meta(cx: _Importer, x: Any, suffix: str = "") -> str:
    """Reshape to torch's output shape; flatten from dim 1 when it is one; the dynamic dim becomes -1."""
    xv = x if isinstance(x, str) else cx.value(x)
    src = cx.type(xv).shape
    dst = cx.meta_shape()
    if dst == src:
        return cx.emit("identity", [xv], suffix=suffix)
    if (len(src) > 2 and len(dst) == 2 and dst[0] == src[0] and all(isinstance(d, int) for d in src[1:])
            and dst[1] == math.prod(src[1:])):  # type: ignore[arg-type]
        return cx.emit("flatten", [xv], {"start": 1, "end": -1}, suffix=suffix)
    unknown = [i for i, d in enumerate(dst) if not isinstance(d, int)]
    if len(unknown) > 1:
        raise FrontendError(f"reshape to {list(dst)} has more than one dynamic dimension")
    return cx.emit("reshape", [xv], {"shape": tuple(-1 if not isinstance(d, int) else d for d in dst)},
                   suffix=suffix)


@converts(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _view(cx: _Importer, a: Args) -> Value:
    return _reshape_to_meta(cx, a["self"])


@converts(aten.flatten.using_ints)
def _flatten(cx: _Importer, a: Args) -> Value:
    xv = cx.value(a["self"])
    if cx.type(xv).rank == 0:
        return _reshape_to_meta(cx, xv)
    return cx.emit("flatten", [xv], {"start": int(a["start_dim"]), "end": int(a["end_dim"])})


def _transpose(cx: _Importer, x: Any, perm: Sequence[int]) -> str:
    xv = cx.value(x)
    rank = cx.type(xv).rank
    perm = tuple(int(p) % rank for p in perm)
    if perm == tuple(range(rank)):
        return cx.emit("identity", [xv])
    return cx.emit("transpose", [xv], {"perm": perm})


@converts(aten.permute.default)
def _permute(cx: _Importer, a: Args) -> Value:
    return _transpose(cx, a["self"], a["dims"])


@converts(aten.transpose.int)
def _transpose_int(cx: _Importer, a: Args) -> Value:
    rank = cx.type(a["self"]).rank
    perm = list(range(rank))
    d0, d1 = int(a["dim0"]) % rank, int(a["dim1"]) % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _transpose(cx, a["self"], perm)


@converts(aten.t.default)
def _t(cx: _Importer, a: Args) -> Value:
    rank = cx.type(a["self"]).rank
    return _transpose(cx, a["self"], list(reversed(range(rank))))


@converts(aten.cat.default)
def _cat(cx: _Importer, a: Args) -> Value:
    ins = [cx.value(t) for t in a["tensors"]]
    rank = cx.type(ins[0]).rank
    if len(ins) == 1:
        return cx.emit("identity", ins)
    return cx.emit("concat", ins, {"axis": int(a["dim"]) % rank})


def _split(cx: _Importer, x: Any, sizes: Sequence[int], dim: int) -> Value:
    xv = cx.value(x)
    axis = int(dim) % cx.type(xv).rank
    outs = cx.emit("split", [xv], {"axis": axis, "sizes": tuple(int(s) for s in sizes)})
    return outs if isinstance(outs, tuple) else (outs,)


def _axis_size(cx: _Importer, x: Any, dim: int) -> int:
    t = cx.type(x)
    n = t.shape[int(dim) % t.rank]
    if not isinstance(n, int):
        raise FrontendError(f"cannot split the dynamic dimension {dim}")
    return n


@converts(aten.split.Tensor)
def _split_tensor(cx: _Importer, a: Args) -> Value:
    n, step = _axis_size(cx, a["self"], a["dim"]), cx.static(a["split_size"])
    return _split(cx, a["self"], [min(step, n - i) for i in range(0, n, step)], a["dim"])


@converts(aten.split_with_sizes.default)
def _split_sizes(cx: _Importer, a: Args) -> Value:
    return _split(cx, a["self"], [cx.static(s) for s in a["split_sizes"]], a["dim"])


@converts(aten.chunk.default)
def _chunk(cx: _Importer, a: Args) -> Value:
    n = _axis_size(cx, a["self"], a["dim"])
    step = -(-n // int(a["chunks"]))
    return _split(cx, a["self"], [min(step, n - i) for i in range(0, n, step)], a["dim"])


@converts(operator.getitem)
def _getitem(cx: _Importer, a: Args) -> Value:
    src, idx = a["args"]
    vals = cx.env.get(src)
    if not isinstance(vals, tuple):
        raise FrontendError(f"getitem on '{src.name}', which is not a multi-output op")
    v = vals[idx]
    if v is None:
        raise FrontendError(f"uses output #{idx} of {op_name(src.target)} (e.g. batch statistics or pooling "
                            "indices), which slimc does not compute")
    return v


def _slice_axis(cx: _Importer, x: Any, dim: int, start: Any, end: Any, step: Any, suffix: str = "") -> str:
    xv = cx.value(x)
    t = cx.type(xv)
    axis = int(dim) % t.rank
    n = t.shape[axis]
    lo = 0 if start is None else cx.static(start)
    hi = _INT64_MAX if end is None else cx.static(end)
    if not isinstance(n, int):
        if (lo, hi, step) in ((0, _INT64_MAX, 1), (0, _INT64_MAX, None)):
            return cx.emit("identity", [xv], suffix=suffix)
        raise FrontendError(f"slicing the dynamic dimension {axis} ({lo}:{hi}:{step})")
    lo, hi, st = slice(lo, hi, 1 if step is None else cx.static(step)).indices(n)
    if (lo, hi, st) == (0, n, 1):
        return cx.emit("identity", [xv], suffix=suffix)
    return cx.emit("slice", [xv], {"axis": axis, "start": lo, "end": max(hi, lo), "step": st}, suffix=suffix)


@converts(aten.slice.Tensor)
def _slice(cx: _Importer, a: Args) -> Value:
    return _slice_axis(cx, a["self"], a["dim"], a["start"], a["end"], a["step"])


@converts(aten.select.int)
def _select(cx: _Importer, a: Args) -> Value:
    """x.select(d, i) = slice [i, i+1) then drop the axis."""
    n = _axis_size(cx, a["self"], a["dim"])
    i = cx.static(a["index"]) % n
    sl = _slice_axis(cx, a["self"], a["dim"], i, i + 1, 1, suffix="slice")
    return _reshape_to_meta(cx, sl)


def _pad(cx: _Importer, x: Any, torch_pads: Sequence[Any], mode: str, value: float) -> str:
    """torch pad pairs run from the last dim backwards; IR pads are [begins..., ends...]."""
    xv = cx.value(x)
    rank = cx.type(xv).rank
    p = [cx.static(v) for v in torch_pads]
    if len(p) % 2 or len(p) > 2 * rank:
        raise FrontendError(f"pad list {p} does not fit a rank-{rank} tensor")
    if any(v < 0 for v in p):
        raise FrontendError(f"negative padding {p} (cropping) is not supported; slice the tensor instead")
    begins, ends = [0] * rank, [0] * rank
    for k in range(len(p) // 2):
        begins[rank - 1 - k], ends[rank - 1 - k] = p[2 * k], p[2 * k + 1]
    ir_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(mode)
    if ir_mode is None:
        raise FrontendError(f"pad mode {mode!r} has no slimc IR equivalent (constant, reflect, replicate)")
    return cx.emit("pad", [xv], {"pads": tuple(begins + ends), "mode": ir_mode, "value": float(value or 0.0)})


@converts(aten.constant_pad_nd.default)
def _constant_pad(cx: _Importer, a: Args) -> Value:
    return _pad(cx, a["self"], a["pad"], "constant", a["value"])


@converts(aten.pad.default)
def _pad_op(cx: _Importer, a: Args) -> Value:
    return _pad(cx, a["self"], a["pad"], a["mode"], a["value"] or 0.0)


@converts(aten.reflection_pad2d.default, aten.reflection_pad1d.default)
def _reflection_pad(cx: _Importer, a: Args) -> Value:
    return _pad(cx, a["self"], a["padding"], "reflect", 0.0)


@converts(aten.replication_pad2d.default, aten.replication_pad1d.default)
def _replication_pad(cx: _Importer, a: Args) -> Value:
    return _pad(cx, a["self"], a["padding"], "replicate", 0.0)


@converts(aten.channel_shuffle.default, aten.native_channel_shuffle.default)
def _channel_shuffle(cx: _Importer, a: Args) -> Value:
    return cx.emit("channel_shuffle", [cx.value(a["self"])], {"groups": int(a["groups"])})


# ---- converters: pooling, reductions, resize ---------------------------------------------------------

def _pool_attrs(a: Args) -> dict[str, Any]:
    kernel = _ints(a["kernel_size"], 2)
    stride = _ints(a["stride"], 2) if a["stride"] else kernel
    return {"kernel": kernel, "stride": stride, "padding": _sym_pad(a["padding"]), "ceil_mode": bool(a["ceil_mode"])}


@converts(aten.max_pool2d.default)
def _max_pool(cx: _Importer, a: Args) -> Value:
    return cx.emit("max_pool2d", [cx.value(a["self"])], {**_pool_attrs(a), "dilation": _ints(a["dilation"], 2)})


@converts(aten.max_pool2d_with_indices.default)
def _max_pool_indices(cx: _Importer, a: Args) -> Value:
    return (_max_pool(cx, a), None)


@converts(aten.avg_pool2d.default)
def _avg_pool(cx: _Importer, a: Args) -> Value:
    if a["divisor_override"] is not None:
        raise FrontendError("avg_pool2d with divisor_override has no slimc IR equivalent")
    return cx.emit("avg_pool2d", [cx.value(a["self"])],
                   {**_pool_attrs(a), "count_include_pad": bool(a["count_include_pad"])})


@converts(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool(cx: _Importer, a: Args) -> Value:
    """Output (1, 1) is a global average pool; the input size itself is an identity."""
    xv = cx.value(a["self"])
    out = cx.meta_shape()[-2:]
    if tuple(out) == (1, 1) and cx.type(xv).rank == 4:
        return cx.emit("global_avg_pool", [xv])
    if tuple(out) == tuple(cx.type(xv).shape[-2:]):
        return cx.emit("identity", [xv])
    return cx.emit("adaptive_avg_pool2d", [xv], {"output_size": tuple(int(d) for d in out)})  # type: ignore[arg-type]


def _reduce_axes(rank: int, dims: Any) -> tuple[int, ...]:
    if dims is None or len(dims) == 0:
        return tuple(range(rank))
    return tuple(sorted({int(d) % rank for d in dims}))


@converts(aten.mean.dim)
def _mean(cx: _Importer, a: Args) -> Value:
    """Mean over H, W of NCHW is a global average pool (flattened to [N, C] without keepdim)."""
    xv = cx.value(a["self"])
    rank = cx.type(xv).rank
    axes, keep = _reduce_axes(rank, a["dim"]), bool(a["keepdim"])
    if rank == 4 and axes == (2, 3):
        if keep:
            return cx.emit("global_avg_pool", [xv])
        gap = cx.emit("global_avg_pool", [xv], suffix="gap")
        return cx.emit("flatten", [gap], {"start": 1, "end": -1})
    return cx.emit("mean", [xv], {"axes": axes, "keepdims": keep})


@converts(aten.mean.default)
def _mean_all(cx: _Importer, a: Args) -> Value:
    xv = cx.value(a["self"])
    return cx.emit("mean", [xv], {"axes": tuple(range(cx.type(xv).rank)), "keepdims": False})


@converts(aten.sum.dim_IntList)
def _sum(cx: _Importer, a: Args) -> Value:
    """No IR sum op: mean times the (static) number of reduced elements."""
    xv = cx.value(a["self"])
    t = cx.type(xv)
    axes = _reduce_axes(t.rank, a["dim"])
    sizes = [t.shape[i] for i in axes]
    if not all(isinstance(s, int) for s in sizes):
        raise FrontendError("sum over a dynamic dimension")
    m = cx.emit("mean", [xv], {"axes": axes, "keepdims": bool(a["keepdim"])}, suffix="mean")
    return cx.emit("mul", [m, cx.value(float(math.prod(sizes)), like=m, slot="count")])  # type: ignore[arg-type]


def _resize(cx: _Importer, x: Any, mode: str, align_corners: bool, scales: Sequence[float | None] | None) -> str:
    """Resize to torch's output size; a scale factor is only exact when in*scale is an integer."""
    xv = cx.value(x)
    t = cx.type(xv)
    size = cx.meta_shape()[-2:]
    if not all(isinstance(s, int) for s in size):
        raise FrontendError("resize to a dynamic spatial size")
    for n_in, n_out, s in zip(t.shape[-2:], size, scales or (None, None)):
        if s is not None and isinstance(n_in, int) and abs(n_in * float(s) - n_out) > 1e-6:  # type: ignore[operator]
            raise FrontendError(f"resize by scale factor {s} from {n_in} to {n_out} pixels is not size-exact; "
                                "pass size= to interpolate instead of scale_factor=")
    return cx.emit("resize", [xv], {"size": tuple(size), "mode": mode, "align_corners": bool(align_corners)})


@converts(aten.upsample_nearest2d.vec)
def _upsample_nearest_vec(cx: _Importer, a: Args) -> Value:
    return _resize(cx, a["input"], "nearest", False, a["scale_factors"])


@converts(aten.upsample_nearest2d.default)
def _upsample_nearest(cx: _Importer, a: Args) -> Value:
    return _resize(cx, a["self"], "nearest", False, (a["scales_h"], a["scales_w"]))


@converts(aten.upsample_bilinear2d.vec)
def _upsample_bilinear_vec(cx: _Importer, a: Args) -> Value:
    return _resize(cx, a["input"], "bilinear", a["align_corners"], a["scale_factors"])


@converts(aten.upsample_bilinear2d.default)
def _upsample_bilinear(cx: _Importer, a: Args) -> Value:
    return _resize(cx, a["self"], "bilinear", a["align_corners"], (a["scales_h"], a["scales_w"]))
