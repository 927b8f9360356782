"""The op registry: the closed set of IR ops with their inputs, typed attributes, type inference and MAC count.

Other per-op knowledge lives in its own registry next to its user (interpreter kernels, ONNX export rules,
frontend conversion tables); each of those is checked against this one in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slimc.errors import IRError
from slimc.ir import AttrValue, Dim, TensorType

REQUIRED = object()

_KINDS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, tuple) and all(_KINDS["int"](x) for x in v),
    "floats": lambda v: isinstance(v, tuple) and all(_KINDS["float"](x) for x in v),
}

#: activations that conv2d/dense can carry as a fused epilogue (see passes/fuse.py)
ACTIVATIONS = ("none", "relu", "relu6", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu")


@dataclass(frozen=True)
class Attr:
    """Schema of one attribute: kind, default (REQUIRED if none) and allowed values."""

    kind: str
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None


InferFn = Callable[[Sequence[TensorType], Mapping[str, Any]], tuple[TensorType, ...]]
MacsFn = Callable[[Sequence[TensorType], Sequence[TensorType], Mapping[str, Any]], int]


@dataclass(frozen=True)
class OpDef:
    """What the IR knows about one op: operand names ('?' optional, '*' variadic), attributes, typing, cost."""

    name: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Attr]
    infer: InferFn
    macs: MacsFn = field(default=lambda i, o, a: 0)
    doc: str = ""

    def arity(self) -> tuple[int, float]:
        required = sum(1 for i in self.inputs if not i.endswith(("?", "*")))
        return required, math.inf if any(i.endswith("*") for i in self.inputs) else len(self.inputs)


OPS: dict[str, OpDef] = {}


def register_op(name: str, inputs: Sequence[str], attrs: Mapping[str, Attr] | None = None, *,
                macs: MacsFn | None = None, doc: str = "") -> Callable[[InferFn], InferFn]:
    """Decorator registering an op with its type-inference function."""

    def deco(infer: InferFn) -> InferFn:
        if name in OPS:
            raise ValueError(f"op {name} registered twice")
        OPS[name] = OpDef(name, tuple(inputs), dict(attrs or {}), infer, macs or (lambda i, o, a: 0), doc)
        return infer

    return deco


def get(op: str) -> OpDef:
    try:
        return OPS[op]
    except KeyError:
        raise IRError(f"unknown op {op!r}; the IR's ops are: {', '.join(sorted(OPS))}") from None


def normalize_attrs(op: str, attrs: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    """Validate attributes against the schema, fill defaults, and turn lists into tuples."""
    d = get(op)
    unknown = set(attrs) - set(d.attrs)
    if unknown:
        raise IRError(f"op {op} has no attribute(s) {', '.join(sorted(unknown))}; "
                      f"its attributes are: {', '.join(d.attrs) or '(none)'}")
    out: dict[str, AttrValue] = {}
    for k, spec in d.attrs.items():
        v = attrs.get(k, spec.default)
        if v is REQUIRED:
            raise IRError(f"op {op} needs attribute {k} ({spec.kind})")
        if isinstance(v, list):
            v = tuple(v)
        if spec.kind == "float" and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if spec.kind == "floats" and isinstance(v, tuple):
            v = tuple(float(x) for x in v)
        if v is not None and not _KINDS[spec.kind](v):
            raise IRError(f"op {op}: attribute {k}={v!r} is not of kind {spec.kind}")
        if spec.choices is not None and v not in spec.choices:
            raise IRError(f"op {op}: attribute {k}={v!r} must be one of {', '.join(map(repr, spec.choices))}")
        out[k] = v
    return out


def non_default_attrs(op: str, attrs: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    """The attributes the printer shows: those that differ from the schema's default."""
    d = OPS.get(op)
    if d is None:
        return dict(attrs)
    return {k: v for k, v in attrs.items() if k not in d.attrs or d.attrs[k].default is REQUIRED
            or d.attrs[k].default != v}


def infer(op: str, in_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """Output types of `op` applied to `in_types`; raises IRError on arity, attribute or shape mismatch."""
    d = get(op)
    lo, hi = d.arity()
    if not lo <= len(in_types) <= hi:
        want = f"{lo}" if lo == hi else f"{lo}..{'any' if hi == math.inf else int(hi)}"
        raise IRError(f"op {op} takes {want} inputs ({', '.join(d.inputs)}), got {len(in_types)}")
    normalize_attrs(op, attrs)
    return tuple(d.infer(in_types, attrs))


def macs(op: str, in_types: Sequence[TensorType], out_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """Multiply-accumulates of one call, symbolic dims counted as 1."""
    return int(get(op).macs(in_types, out_types, attrs))


def make_node(name: str, op: str, inputs: Sequence[str], in_types: Sequence[TensorType],
              attrs: Mapping[str, AttrValue] | None = None, source: Sequence[str] = ()):
    """Build a Node with normalized attributes and inferred output types."""
    from slimc.ir import Node

    full = normalize_attrs(op, attrs or {})
    return Node(name, op, tuple(inputs), full, infer(op, in_types, full), tuple(source))


# ---- shape helpers --------------------------------------------------------------------------------

def _fail(msg: str) -> IRError:
    return IRError(msg)


def _norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise _fail(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


def broadcast_shapes(a: Sequence[Dim], b: Sequence[Dim], op: str = "broadcast") -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise _fail(f"{op}: shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return tuple(reversed(out))


def _spatial_out(size: Dim, k: int, s: int, p0: int, p1: int, d: int, ceil: bool, op: str) -> Dim:
    if isinstance(size, str):
        raise _fail(f"{op}: spatial dims must be static, got {size!r}")
    eff = d * (k - 1) + 1
    num = size + p0 + p1 - eff
    if num < 0:
        raise _fail(f"{op}: window {eff} larger than padded input {size + p0 + p1}")
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p0:  # the last window must start inside the input (PyTorch/ONNX rule)
        out -= 1
    return out


def _same_dtype(types: Sequence[TensorType], op: str) -> str:
    dts = {t.dtype for t in types}
    if len(dts) != 1:
        raise _fail(f"{op}: operand dtypes differ ({', '.join(sorted(dts))})")
    return types[0].dtype


# ---- op definitions -------------------------------------------------------------------------------

_ACT = {
    "act": Attr("str", "none", ACTIVATIONS),
    "clip_min": Attr("float", None),
    "clip_max": Attr("float", None),
}


def _conv_macs(i: Sequence[TensorType], o: Sequence[TensorType], a: Mapping[str, Any]) -> int:
    w = i[1]
    return o[0].numel() * math.prod(w.shape[1:])  # type: ignore[arg-type]


@register_op("conv2d", ["x", "w", "b?"], {
    "stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0, 0, 0)), "dilation": Attr("ints", (1, 1)),
    "groups": Attr("int", 1), **_ACT,
}, macs=_conv_macs, doc="NCHW convolution, OIHW weight; padding is [top, left, bottom, right]")
def _conv2d(t, a, op: str = "conv2d"):
    """Conv shape inference; `op` names the op in errors (qconv2d reuses it)."""
    x, w = t[0], t[1]
    if x.rank != 4 or w.rank != 4:
        raise _fail(f"{op}: expects NCHW input and OIHW weight, got {x} and {w}")
    g = a.get("groups", 1)
    c = x.shape[1]
    if isinstance(c, int) and c != w.shape[1] * g:
        raise _fail(f"{op}: input has {c} channels but weight {w} with groups={g} expects {w.shape[1] * g}")
    if isinstance(w.shape[0], int) and w.shape[0] % g:
        raise _fail(f"{op}: {w.shape[0]} output channels not divisible by groups={g}")
    if len(t) == 3 and t[2].shape != (w.shape[0],):
        raise _fail(f"{op}: bias {t[2]} does not match {w.shape[0]} output channels")
    st, pad, dil = a.get("stride", (1, 1)), a.get("padding", (0, 0, 0, 0)), a.get("dilation", (1, 1))
    if len(st) != 2 or len(pad) != 4 or len(dil) != 2:
        raise _fail(f"{op}: stride/dilation need 2 values and padding 4 ([top, left, bottom, right])")
    h = _spatial_out(x.shape[2], w.shape[2], st[0], pad[0], pad[2], dil[0], False, op)
    wd = _spatial_out(x.shape[3], w.shape[3], st[1], pad[1], pad[3], dil[1], False, op)
    _check_act(a, op)
    return (TensorType((x.shape[0], w.shape[0], h, wd), _same_dtype(t, op)),)


def _check_act(a: Mapping[str, Any], op: str) -> None:
    act = a.get("act", "none")
    has_bounds = a.get("clip_min") is not None or a.get("clip_max") is not None
    if (act == "clip") != has_bounds:
        raise _fail(f"{op}: clip_min/clip_max go with act=\"clip\" and only with it")


@register_op("dense", ["x", "w", "b?"], _ACT,
             macs=lambda i, o, a: o[0].numel() * i[1].shape[1],  # type: ignore[operator]
             doc="y = x @ w.T + b over the last axis of x; w is [out, in]")
def _dense(t, a, op: str = "dense"):
    """Dense shape inference; `op` names the op in errors (qdense reuses it)."""
    x, w = t[0], t[1]
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise _fail(f"{op}: input {x} does not fit weight {w} ([out, in])")
    if len(t) == 3 and t[2].shape != (w.shape[0],):
        raise _fail(f"{op}: bias {t[2]} does not match {w.shape[0]} outputs")
    _check_act(a, op)
    return (TensorType(x.shape[:-1] + (w.shape[0],), _same_dtype(t, op)),)


def _matmul_macs(i, o, a) -> int:
    return o[0].numel() * i[0].shape[-1]


@register_op("matmul", ["a", "b"], macs=_matmul_macs, doc="batched matrix product with broadcasting")
def _matmul(t, a):
    x, y = t
    if x.rank < 2 or y.rank < 2 or x.shape[-1] != y.shape[-2]:
        raise _fail(f"matmul: shapes {x} and {y} do not multiply")
    batch = broadcast_shapes(x.shape[:-2], y.shape[:-2], "matmul")
    return (TensorType(batch + (x.shape[-2], y.shape[-1]), _same_dtype(t, "matmul")),)


@register_op("batch_norm", ["x", "scale", "bias", "mean", "var"], {"eps": Attr("float", 1e-5)},
             doc="inference batch norm over axis 1")
def _batch_norm(t, a):
    x = t[0]
    if x.rank < 2:
        raise _fail(f"batch_norm: input {x} has no channel axis")
    for p in t[1:]:
        if p.shape != (x.shape[1],):
            raise _fail(f"batch_norm: parameter {p} does not match {x.shape[1]} channels")
    return (x,)


@register_op("layer_norm", ["x", "scale?", "bias?"], {"axis": Attr("int", -1), "eps": Attr("float", 1e-5)},
             doc="normalize over axes [axis, rank)")
def _layer_norm(t, a):
    x = t[0]
    ax = _norm_axis(a.get("axis", -1), x.rank, "layer_norm")
    for p in t[1:]:
        if p.shape != x.shape[ax:]:
            raise _fail(f"layer_norm: parameter {p} does not match normalized shape {x.shape[ax:]}")
    return (x,)


def _unary(name: str, attrs: Mapping[str, Attr] | None = None, doc: str = "") -> None:
    register_op(name, ["x"], attrs, doc=doc)(lambda t, a: (t[0],))


_unary("identity", doc="no-op (removed by canonicalize)")
_unary("dropout", {"p": Attr("float", 0.5)}, doc="inference no-op (removed by canonicalize)")
_unary("relu")
_unary("relu6")
_unary("clip", {"min": Attr("float", None), "max": Attr("float", None)})
_unary("hardswish")
_unary("hardsigmoid", {"alpha": Attr("float", 1.0 / 6.0), "beta": Attr("float", 0.5)},
       doc="max(0, min(1, alpha*x + beta))")
_unary("sigmoid")
_unary("silu")
_unary("gelu", {"approximate": Attr("str", "none", ("none", "tanh"))})
_unary("tanh")
_unary("exp")
_unary("sqrt")
_unary("neg")
_unary("erf")


def _binary(name: str) -> None:
    def infer_(t, a):
        return (TensorType(broadcast_shapes(t[0].shape, t[1].shape, name), _same_dtype(t, name)),)

    register_op(name, ["a", "b"], doc="elementwise with numpy broadcasting")(infer_)


for _n in ("add", "sub", "mul", "div", "pow"):
    _binary(_n)


@register_op("concat", ["x*"], {"axis": Attr("int")})
def _concat(t, a):
    if not t:
        raise _fail("concat: needs at least one input")
    ax = _norm_axis(a["axis"], t[0].rank, "concat")
    total: Dim = 0
    for x in t:
        if x.rank != t[0].rank or any(x.shape[i] != t[0].shape[i] for i in range(x.rank) if i != ax):
            raise _fail(f"concat: {x} does not match {t[0]} outside axis {ax}")
        total = total + x.shape[ax] if isinstance(total, int) and isinstance(x.shape[ax], int) else "?"
    if total == "?":
        raise _fail("concat: the concatenated axis must be static")
    shape = list(t[0].shape)
    shape[ax] = total
    return (TensorType(tuple(shape), _same_dtype(t, "concat")),)


@register_op("split", ["x"], {"axis": Attr("int"), "sizes": Attr("ints")}, doc="one output per size")
def _split(t, a):
    x = t[0]
    ax = _norm_axis(a["axis"], x.rank, "split")
    if sum(a["sizes"]) != x.shape[ax]:
        raise _fail(f"split: sizes {list(a['sizes'])} do not add up to {x.shape[ax]} along axis {ax}")
    outs = []
    for s in a["sizes"]:
        shape = list(x.shape)
        shape[ax] = s
        outs.append(TensorType(tuple(shape), x.dtype))
    return tuple(outs)


@register_op("slice", ["x"], {"axis": Attr("int"), "start": Attr("int"), "end": Attr("int"), "step": Attr("int", 1)},
             doc="x[start:end:step] along one axis, Python semantics (clamped), step > 0")
def _slice(t, a):
    x = t[0]
    ax = _norm_axis(a["axis"], x.rank, "slice")
    n = x.shape[ax]
    if not isinstance(n, int):
        raise _fail("slice: the sliced axis must be static")
    if a.get("step", 1) <= 0:
        raise _fail("slice: step must be positive")
    shape = list(x.shape)
    shape[ax] = len(range(n)[a["start"]:a["end"]:a.get("step", 1)])
    return (TensorType(tuple(shape), x.dtype),)


def _resolve_reshape(src: Sequence[Dim], target: Sequence[int], op: str) -> tuple[Dim, ...]:
    """Target dims: ints, 0 copies the input dim (ONNX), -1 is inferred; a symbolic batch may flow into -1."""
    out: list[Dim] = [src[i] if d == 0 and i < len(src) else d for i, d in enumerate(target)]
    if sum(1 for d in out if d == -1) > 1:
        raise _fail(f"{op}: at most one -1 in target shape {list(target)}")
    syms = [d for d in src if isinstance(d, str)]
    known_src = math.prod(d for d in src if isinstance(d, int))
    known_out = math.prod(d for d in out if isinstance(d, int) and d != -1)
    out_syms = [d for d in out if isinstance(d, str)]
    if -1 in out:
        if len(syms) - len(out_syms) == 1 and known_src == known_out and syms[-1] not in out_syms:
            out[out.index(-1)] = syms[-1]
        elif sorted(syms) != sorted(out_syms) or known_out == 0 or known_src % known_out:
            raise _fail(f"{op}: cannot reshape {tuple(src)} to {list(target)}")
        else:
            out[out.index(-1)] = known_src // known_out
    elif sorted(syms) != sorted(out_syms) or known_src != known_out:
        raise _fail(f"{op}: cannot reshape {tuple(src)} to {list(target)}")
    return tuple(out)


@register_op("reshape", ["x"], {"shape": Attr("ints")}, doc="target dims: ints, -1 inferred (batch may be symbolic)")
def _reshape(t, a):
    return (TensorType(_resolve_reshape(t[0].shape, a["shape"], "reshape"), t[0].dtype),)


@register_op("flatten", ["x"], {"start": Attr("int", 1), "end": Attr("int", -1)}, doc="merge dims start..end")
def _flatten(t, a):
    x = t[0]
    s, e = _norm_axis(a.get("start", 1), x.rank, "flatten"), _norm_axis(a.get("end", -1), x.rank, "flatten")
    if s > e:
        raise _fail(f"flatten: start {s} after end {e}")
    mid = x.shape[s:e + 1]
    if not all(isinstance(d, int) for d in mid) and len(mid) > 1:
        raise _fail(f"flatten: merged dims {mid} must be static")
    merged = math.prod(mid) if all(isinstance(d, int) for d in mid) else mid[0]  # type: ignore[arg-type]
    return (TensorType(x.shape[:s] + (merged,) + x.shape[e + 1:], x.dtype),)


@register_op("transpose", ["x"], {"perm": Attr("ints")})
def _transpose(t, a):
    x, perm = t[0], a["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise _fail(f"transpose: perm {list(perm)} is not a permutation of rank {x.rank}")
    return (TensorType(tuple(x.shape[p] for p in perm), x.dtype),)


@register_op("pad", ["x"], {"pads": Attr("ints"), "mode": Attr("str", "constant", ("constant", "reflect", "edge")),
                            "value": Attr("float", 0.0)},
             doc="pads = [begin_0..begin_{r-1}, end_0..end_{r-1}] (ONNX order)")
def _pad(t, a):
    x, p = t[0], a["pads"]
    if len(p) != 2 * x.rank:
        raise _fail(f"pad: needs {2 * x.rank} pads for rank {x.rank}, got {len(p)}")
    shape = [d + p[i] + p[i + x.rank] if isinstance(d, int) else d for i, d in enumerate(x.shape)]
    return (TensorType(tuple(shape), x.dtype),)


_POOL = {"kernel": Attr("ints"), "stride": Attr("ints"), "padding": Attr("ints", (0, 0, 0, 0)),
         "ceil_mode": Attr("bool", False)}


def _pool_infer(op: str):
    def infer_(t, a):
        x = t[0]
        if x.rank != 4:
            raise _fail(f"{op}: expects NCHW input, got {x}")
        k, s, p, d = a["kernel"], a["stride"], a.get("padding", (0, 0, 0, 0)), a.get("dilation", (1, 1))
        ceil = a.get("ceil_mode", False)
        h = _spatial_out(x.shape[2], k[0], s[0], p[0], p[2], d[0], ceil, op)
        w = _spatial_out(x.shape[3], k[1], s[1], p[1], p[3], d[1], ceil, op)
        return (TensorType((x.shape[0], x.shape[1], h, w), x.dtype),)

    return infer_


register_op("max_pool2d", ["x"], {**_POOL, "dilation": Attr("ints", (1, 1))})(_pool_infer("max_pool2d"))
register_op("avg_pool2d", ["x"], {**_POOL, "count_include_pad": Attr("bool", True)})(_pool_infer("avg_pool2d"))


@register_op("global_avg_pool", ["x"], doc="mean over H, W keeping them as 1 (float32: summed in float64, so order-free)")
def _gap(t, a):
    x = t[0]
    if x.rank != 4:
        raise _fail(f"global_avg_pool: expects NCHW input, got {x}")
    return (TensorType(x.shape[:2] + (1, 1), x.dtype),)


@register_op("adaptive_avg_pool2d", ["x"], {"output_size": Attr("ints")})
def _aap(t, a):
    x = t[0]
    if x.rank != 4 or len(a["output_size"]) != 2:
        raise _fail(f"adaptive_avg_pool2d: expects NCHW input and 2 output sizes, got {x}")
    return (TensorType(x.shape[:2] + tuple(a["output_size"]), x.dtype),)


@register_op("mean", ["x"], {"axes": Attr("ints"), "keepdims": Attr("bool", False)})
def _mean(t, a):
    x = t[0]
    axes = {_norm_axis(ax, x.rank, "mean") for ax in a["axes"]}
    keep = a.get("keepdims", False)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
    return (TensorType(shape, x.dtype),)


@register_op("softmax", ["x"], {"axis": Attr("int", -1)})
def _softmax(t, a):
    _norm_axis(a.get("axis", -1), t[0].rank, "softmax")
    return (t[0],)


@register_op("resize", ["x"], {"size": Attr("ints"), "mode": Attr("str", "nearest", ("nearest", "bilinear")),
                               "align_corners": Attr("bool", False)}, doc="NCHW spatial resize to size [H, W]")
def _resize(t, a):
    x = t[0]
    if x.rank != 4 or len(a["size"]) != 2:
        raise _fail(f"resize: expects NCHW input and a 2-value size, got {x}")
    return (TensorType(x.shape[:2] + tuple(a["size"]), x.dtype),)


@register_op("channel_shuffle", ["x"], {"groups": Attr("int")}, doc="ShuffleNet's channel permutation on axis 1")
def _shuffle(t, a):
    x = t[0]
    if x.rank < 2 or (isinstance(x.shape[1], int) and x.shape[1] % a["groups"]):
        raise _fail(f"channel_shuffle: {x} channels not divisible by groups={a['groups']}")
    return (x,)


# ---- quantization ---------------------------------------------------------------------------------

#: integer types a quantized value may have, with their saturation bounds
#: (uint16: wide activation grids of layers that keep int8 weights, quant-fallback{to=int16})
QUANT_DTYPES: dict[str, tuple[int, int]] = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535)}


def _check_qparams(x: TensorType, scale: TensorType, zp: TensorType, axis: int, op: str) -> None:
    if scale.dtype != "float32":
        raise _fail(f"{op}: scale must be float32, got {scale}")
    if zp.dtype not in QUANT_DTYPES:
        raise _fail(f"{op}: zero_point must be one of {', '.join(QUANT_DTYPES)}, got {zp}")
    if scale.shape != zp.shape or scale.rank > 1:
        raise _fail(f"{op}: scale {scale} and zero_point {zp} must both be scalars or both [C]")
    if scale.rank == 1:
        ax = _norm_axis(axis, x.rank, op)
        if isinstance(x.shape[ax], int) and x.shape[ax] != scale.shape[0]:
            raise _fail(f"{op}: {scale.shape[0]} scales for {x.shape[ax]} channels on axis {axis} of {x}")


@register_op("quantize", ["x", "scale", "zero_point"], {"axis": Attr("int", 1)},
             doc="ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point); per-tensor or along axis")
def _quantize(t, a):
    x, s, z = t
    if not x.dtype.startswith("float"):
        raise _fail(f"quantize: input must be float, got {x}")
    _check_qparams(x, s, z, a.get("axis", 1), "quantize")
    return (TensorType(x.shape, z.dtype),)


@register_op("dequantize", ["x", "scale", "zero_point"], {"axis": Attr("int", 1)},
             doc="ONNX DequantizeLinear: (x - zero_point) * scale as float32; per-tensor or along axis")
def _dequantize(t, a):
    x, s, z = t
    if x.dtype != z.dtype:
        raise _fail(f"dequantize: input {x} and zero_point {z} differ in dtype")
    _check_qparams(x, s, z, a.get("axis", 1), "dequantize")
    return (TensorType(x.shape, "float32"),)


#: the requantizing epilogue of integer ops: float32 output, or saturate(round(v / out_scale) + out_zero_point)
_QOUT = {
    "out_dtype": Attr("str", "float32", ("float32", *QUANT_DTYPES)),
    "out_scale": Attr("float", 1.0),
    "out_zero_point": Attr("int", 0),
}


def _check_qout(a: Mapping[str, Any], op: str) -> str:
    dt = a.get("out_dtype", "float32")
    if dt != "float32":
        lo, hi = QUANT_DTYPES[dt]
        if not lo <= a.get("out_zero_point", 0) <= hi or not a.get("out_scale", 1.0) > 0:
            raise _fail(f"{op}: out_zero_point must lie in [{lo}, {hi}] and out_scale be positive")
    _check_act(a, op)
    return dt


def _check_integer_layer(t: Sequence[TensorType], channels: Dim, op: str) -> None:
    x, w, b, s = t
    if x.dtype not in QUANT_DTYPES or w.dtype != "int8":
        raise _fail(f"{op}: expects a {'/'.join(QUANT_DTYPES)} input and an int8 weight, got {x} and {w}")
    if b.dtype != "int32" or b.shape != (channels,) or s.dtype != "float32" or s.shape != (channels,):
        raise _fail(f"{op}: bias must be int32[{channels}] and scale float32[{channels}], got {b} and {s}")


@register_op("qconv2d", ["x", "w", "bias", "scale"], {
    "stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0, 0, 0)), "dilation": Attr("ints", (1, 1)),
    "groups": Attr("int", 1), "x_zero_point": Attr("int", 0), **_ACT, **_QOUT,
}, macs=_conv_macs, doc="integer conv: acc = conv(x, w) in int32 (pads hold x_zero_point) + bias; "
                        "v = act(acc * scale[c]); then the requantizing epilogue")
def _qconv2d(t, a):
    x, w = t[0], t[1]
    _check_integer_layer(t, w.shape[0], "qconv2d")
    fx, fw = TensorType(x.shape, "float32"), TensorType(w.shape, "float32")
    conv_attrs = {k: v for k, v in a.items() if k in ("stride", "padding", "dilation", "groups")}
    (out,) = _conv2d([fx, fw], conv_attrs, "qconv2d")
    return (TensorType(out.shape, _check_qout(a, "qconv2d")),)


@register_op("qdense", ["x", "w", "bias", "scale"], {"x_zero_point": Attr("int", 0), **_ACT, **_QOUT},
             macs=lambda i, o, a: o[0].numel() * i[1].shape[1],  # type: ignore[operator]
             doc="integer dense: acc = x @ w.T in int32 + bias; v = act(acc * scale[n]); then the requantizing epilogue")
def _qdense(t, a):
    x, w = t[0], t[1]
    _check_integer_layer(t, w.shape[0], "qdense")
    (out,) = _dense([TensorType(x.shape, "float32"), TensorType(w.shape, "float32")], {}, "qdense")
    return (TensorType(out.shape, _check_qout(a, "qdense")),)


@register_op("qadd", ["a", "b"], {
    "a_scale": Attr("float"), "a_zero_point": Attr("int"), "b_scale": Attr("float"), "b_zero_point": Attr("int"),
    **_ACT, **_QOUT,
}, doc="integer add: v = act((a - a_zero_point) * a_scale + (b - b_zero_point) * b_scale); then the epilogue")
def _qadd(t, a):
    x, y = t
    if x.dtype not in QUANT_DTYPES or y.dtype not in QUANT_DTYPES:
        raise _fail(f"qadd: expects quantized operands, got {x} and {y}")
    shape = broadcast_shapes(x.shape, y.shape, "qadd")
    return (TensorType(shape, _check_qout(a, "qadd")),)
