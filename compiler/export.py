"""Exporters: IR Graph → ONNX (one emitter per IR op) and → a self-contained torch.export program (.pt2)."""

from __future__ import annotations

import keyword
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimc import ops
from slimc.errors import IRError, SlimcError
from slimc.ir import Graph, Node, TensorType, unique_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

MIN_OPSET, MAX_OPSET = 11, 21


class ExportError(SlimcError):
    """A graph cannot be written in the requested format (op not expressible, missing weights, I/O failure)."""


# ---- atomic writes --------------------------------------------------------------------------------

def _write_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write through a temp file in the target directory and rename it into place; never leave a partial file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1]  # keep the extension: torch.export.save warns on other names
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---- the ONNX emitter registry ---------------------------------------------------------------------

@dataclass
class _Builder:
    """ONNX graph under construction: nodes, initializers and unique names."""

    graph: Graph
    opset: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    node_names: set[str] = field(default_factory=set)
    current: Node | None = None

    def fresh(self, base: str) -> str:
        name = unique_name(base, self.taken)
        self.taken.add(name)
        return name

    def tmp(self, suffix: str) -> str:
        """A fresh intermediate value name derived from the current IR node."""
        assert self.current is not None
        return self.fresh(f"{self.current.name}.{suffix}")

    def const(self, suffix: str, value: Any, dtype: Any = None) -> str:
        """A new initializer (shape tensors, scalars of an expansion)."""
        arr = np.asarray(value, dtype=dtype)
        name = self.tmp(suffix)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, suffix: str, values: Sequence[int]) -> str:
        return self.const(suffix, list(values), np.int64)

    def add(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | str, **attrs: Any) -> list[str]:
        """Append one ONNX node (named after the current IR node) and return its outputs."""
        assert self.current is not None
        outs = [outputs] if isinstance(outputs, str) else list(outputs)
        base = self.current.name if self.current.name not in self.node_names else f"{self.current.name}.{op_type}"
        name, i = base, 1
        while name in self.node_names:
            name = f"{base}_{i}"
            i += 1
        self.node_names.add(name)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs

    def error(self, msg: str) -> ExportError:
        n = self.current
        where = f"node {n.name} ({n.op})" if n else "graph"
        return ExportError(f"cannot export graph {self.graph.name} to ONNX opset {self.opset}: {where}: {msg}")


Emitter = Callable[[_Builder, Node, list[str], list[str]], None]


def _dtype(n: Node) -> np.dtype:
    """Element type for an emitter's constants: the node's (first) output type, also valid for fused epilogues."""
    return np.dtype(n.out_types[0].dtype)


EMITTERS: dict[str, Emitter] = {}


def emits(*ir_ops: str) -> Callable[[Emitter], Emitter]:
    """Register the ONNX emitter of one or more IR ops."""

    def deco(fn: Emitter) -> Emitter:
        for op in ir_ops:
            EMITTERS[op] = fn
        return fn

    return deco


def _emit_node(b: _Builder, node: Node, ins: list[str], outs: list[str]) -> None:
    fn = EMITTERS.get(node.op)
    if fn is None:
        raise b.error(f"IR op {node.op} has no ONNX emitter; export the graph before the pass that introduced it")
    fn(b, node, ins, outs)


def _with_activation(b: _Builder, node: Node, outs: list[str], core: Callable[[str], None]) -> None:
    """Run `core` into the output, or into a temp followed by the fused activation (conv2d/dense `act`)."""
    act = node.attrs.get("act", "none")
    if act == "none":
        core(outs[0])
        return
    pre = b.tmp("pre_act")
    core(pre)
    attrs = {"min": node.attrs.get("clip_min"), "max": node.attrs.get("clip_max")} if act == "clip" else {}
    act_node = Node(f"{node.name}", act, (pre,), ops.normalize_attrs(act, attrs), node.out_types, node.source)
    _emit_node(b, act_node, [pre], outs)


# ---- compute ops --------------------------------------------------------------------------------

@emits("conv2d")
def _conv2d(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    k = b.graph.type_of(n.inputs[1]).shape[2:]
    a = n.attrs
    _with_activation(b, n, outs, lambda y: b.add(
        "Conv", ins, y, kernel_shape=list(k), strides=list(a["stride"]), pads=list(a["padding"]),
        dilations=list(a["dilation"]), group=a["groups"]))


@emits("dense")
def _dense(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    def core(y: str) -> None:
        if b.graph.type_of(n.inputs[0]).rank == 2:
            b.add("Gemm", ins, y, transB=1)
            return
        wt = b.add("Transpose", [ins[1]], b.tmp("wT"), perm=[1, 0])[0]
        if len(ins) == 2:
            b.add("MatMul", [ins[0], wt], y)
        else:
            mm = b.add("MatMul", [ins[0], wt], b.tmp("mm"))[0]
            b.add("Add", [mm, ins[2]], y)

    _with_activation(b, n, outs, core)


@emits("matmul")
def _matmul(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("MatMul", ins, outs)


@emits("batch_norm")
def _batch_norm(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("BatchNormalization", ins, outs, epsilon=n.attrs["eps"])


def _reduce_mean(b: _Builder, x: str, axes: Sequence[int], keepdims: bool, out: str) -> str:
    """ReduceMean with axes as attribute (opset < 18) or input (opset >= 18)."""
    if b.opset >= 18:
        return b.add("ReduceMean", [x, b.ints("axes", axes)], out, keepdims=int(keepdims))[0]
    return b.add("ReduceMean", [x], out, axes=list(axes), keepdims=int(keepdims))[0]


@emits("layer_norm")
def _layer_norm(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    x_t = b.graph.type_of(n.inputs[0])
    axis = n.attrs["axis"] % x_t.rank
    eps = n.attrs["eps"]
    dt = _dtype(n)
    if b.opset >= 17:
        scale = ins[1] if len(ins) > 1 else None
        if scale is None:
            norm_shape = x_t.shape[axis:]
            if not all(isinstance(d, int) for d in norm_shape):
                raise b.error(f"layer_norm without scale over symbolic dims {norm_shape}")
            scale = b.const("ones", np.ones(norm_shape, dt))
        b.add("LayerNormalization", [ins[0], scale] + ins[2:], outs, axis=axis, epsilon=eps)
        return
    axes = list(range(axis, x_t.rank))
    mean = _reduce_mean(b, ins[0], axes, True, b.tmp("mean"))
    d = b.add("Sub", [ins[0], mean], b.tmp("centered"))[0]
    sq = b.add("Mul", [d, d], b.tmp("sq"))[0]
    var = _reduce_mean(b, sq, axes, True, b.tmp("var"))
    ve = b.add("Add", [var, b.const("eps", eps, dt)], b.tmp("var_eps"))[0]
    std = b.add("Sqrt", [ve], b.tmp("std"))[0]
    steps: list[tuple[str, str]] = [("Mul", ins[1])] if len(ins) > 1 else []
    steps += [("Add", ins[2])] if len(ins) > 2 else []
    cur = b.add("Div", [d, std], outs[0] if not steps else b.tmp("normed"))[0]
    for j, (op, operand) in enumerate(steps):
        cur = b.add(op, [cur, operand], outs[0] if j == len(steps) - 1 else b.tmp(op.lower()))[0]


# ---- elementwise ----------------------------------------------------------------------------------

_DIRECT_UNARY = {"identity": "Identity", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp",
                 "sqrt": "Sqrt", "neg": "Neg", "erf": "Erf"}


@emits(*_DIRECT_UNARY)
def _unary(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add(_DIRECT_UNARY[n.op], ins, outs)


@emits("dropout")
def _dropout(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    if b.opset >= 12:
        b.add("Dropout", [ins[0], b.const("ratio", n.attrs["p"], _dtype(n))], outs)
    else:
        b.add("Dropout", ins, outs, ratio=n.attrs["p"])


def _clip(b: _Builder, x: str, dt: np.dtype, lo: float | None, hi: float | None, out: str) -> None:
    args = [x, "" if lo is None else b.const("min", lo, dt), "" if hi is None else b.const("max", hi, dt)]
    while args[-1] == "":
        args.pop()
    b.add("Clip", args, out)


@emits("relu6")
def _relu6(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    _clip(b, ins[0], _dtype(n), 0.0, 6.0, outs[0])


@emits("clip")
def _clip_op(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    _clip(b, ins[0], _dtype(n), n.attrs["min"], n.attrs["max"], outs[0])


@emits("hardsigmoid")
def _hardsigmoid(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("HardSigmoid", ins, outs, alpha=n.attrs["alpha"], beta=n.attrs["beta"])


@emits("hardswish")
def _hardswish(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    if b.opset >= 14:
        b.add("HardSwish", ins, outs)
        return
    hs = b.add("HardSigmoid", ins, b.tmp("hsig"), alpha=1.0 / 6.0, beta=0.5)[0]
    b.add("Mul", [ins[0], hs], outs)


@emits("silu")
def _silu(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    s = b.add("Sigmoid", ins, b.tmp("sigmoid"))[0]
    b.add("Mul", [ins[0], s], outs)


@emits("gelu")
def _gelu(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    approx = n.attrs["approximate"]
    if b.opset >= 20:
        b.add("Gelu", ins, outs, approximate=approx)
        return
    dt, x = _dtype(n), ins[0]
    if approx == "none":  # 0.5 x (1 + erf(x / sqrt 2))
        inner = b.add("Mul", [x, b.const("inv_sqrt2", 1 / math.sqrt(2), dt)], b.tmp("scaled"))[0]
        g = b.add("Erf", [inner], b.tmp("erf"))[0]
    else:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = b.add("Mul", [x, b.add("Mul", [x, x], b.tmp("x2"))[0]], b.tmp("x3"))[0]
        poly = b.add("Add", [x, b.add("Mul", [x3, b.const("c", 0.044715, dt)], b.tmp("cx3"))[0]], b.tmp("poly"))[0]
        inner = b.add("Mul", [poly, b.const("k", math.sqrt(2 / math.pi), dt)], b.tmp("scaled"))[0]
        g = b.add("Tanh", [inner], b.tmp("tanh"))[0]
    one_plus = b.add("Add", [g, b.const("one", 1.0, dt)], b.tmp("one_plus"))[0]
    half_x = b.add("Mul", [x, b.const("half", 0.5, dt)], b.tmp("half_x"))[0]
    b.add("Mul", [half_x, one_plus], outs)


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow"}


@emits(*_BINARY)
def _binary(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add(_BINARY[n.op], ins, outs)


# ---- data movement --------------------------------------------------------------------------------

@emits("concat")
def _concat(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("Concat", ins, outs, axis=n.attrs["axis"])


@emits("split")
def _split(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    sizes = list(n.attrs["sizes"])
    if b.opset >= 13:
        b.add("Split", [ins[0], b.ints("sizes", sizes)], outs, axis=n.attrs["axis"])
    else:
        b.add("Split", ins, outs, axis=n.attrs["axis"], split=sizes)


@emits("slice")
def _slice(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    a = n.attrs
    b.add("Slice", [ins[0], b.ints("starts", [a["start"]]), b.ints("ends", [a["end"]]),
                    b.ints("axes", [a["axis"]]), b.ints("steps", [a["step"]])], outs)


@emits("reshape")
def _reshape(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("Reshape", [ins[0], b.ints("shape", n.attrs["shape"])], outs)


@emits("flatten")
def _flatten(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    rank = b.graph.type_of(n.inputs[0]).rank
    start, end = n.attrs["start"] % rank, n.attrs["end"] % rank
    if start == 1 and end == rank - 1:
        b.add("Flatten", ins, outs, axis=1)
        return
    target: list[int] = []
    for i, d in enumerate(n.out_types[0].shape):
        target.append(0 if i < start else d if isinstance(d, int) else -1)
    if target.count(-1) > 1:
        raise b.error(f"flatten to {n.out_types[0]} has several symbolic dims after axis {start}")
    b.add("Reshape", [ins[0], b.ints("shape", target)], outs)


@emits("transpose")
def _transpose(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("Transpose", ins, outs, perm=list(n.attrs["perm"]))


@emits("pad")
def _pad(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    mode = n.attrs["mode"]
    args = [ins[0], b.ints("pads", n.attrs["pads"])]
    if mode == "constant":
        args.append(b.const("value", n.attrs["value"], _dtype(n)))
    b.add("Pad", args, outs, mode=mode)


@emits("channel_shuffle")
def _channel_shuffle(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    t = b.graph.type_of(n.inputs[0])
    c, g = t.shape[1], n.attrs["groups"]
    if not isinstance(c, int):
        raise b.error("channel_shuffle needs a static channel count")
    grouped = b.add("Reshape", [ins[0], b.ints("grouped", [0, g, c // g, -1])], b.tmp("grouped"))[0]
    swapped = b.add("Transpose", [grouped], b.tmp("swapped"), perm=[0, 2, 1, 3])[0]
    shape = b.add("Shape", [ins[0]], b.tmp("shape"))[0]
    b.add("Reshape", [swapped, shape], outs)


# ---- pooling, reductions, resize ------------------------------------------------------------------

@emits("max_pool2d")
def _max_pool(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    a = n.attrs
    b.add("MaxPool", ins, outs, kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=list(a["padding"]),
          dilations=list(a["dilation"]), ceil_mode=int(a["ceil_mode"]))


@emits("avg_pool2d")
def _avg_pool(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    a = n.attrs
    b.add("AveragePool", ins, outs, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
          pads=list(a["padding"]), ceil_mode=int(a["ceil_mode"]), count_include_pad=int(a["count_include_pad"]))


@emits("global_avg_pool")
def _gap(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    b.add("GlobalAveragePool", ins, outs)


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """[out, size] averaging matrix of PyTorch's adaptive pooling bins (floor start, ceil end)."""
    m = np.zeros((out, size), dtype=np.float64)
    for i in range(out):
        lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


@emits("adaptive_avg_pool2d")
def _adaptive_avg_pool(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    h, w = b.graph.type_of(n.inputs[0]).shape[2:]
    oh, ow = n.attrs["output_size"]
    if (oh, ow) == (1, 1):
        b.add("GlobalAveragePool", ins, outs)
        return
    if not isinstance(h, int) or not isinstance(w, int):
        raise b.error("adaptive_avg_pool2d needs static spatial dims")
    if h % oh == 0 and w % ow == 0:
        k = [h // oh, w // ow]
        b.add("AveragePool", ins, outs, kernel_shape=k, strides=k)
        return
    dt = _dtype(n)  # uneven bins: separable averaging matrices, x @ Pw^T then Ph @ (.)
    cols = b.add("MatMul", [ins[0], b.const("pool_w", _adaptive_matrix(w, ow).T, dt)], b.tmp("cols"))[0]
    b.add("MatMul", [b.const("pool_h", _adaptive_matrix(h, oh), dt), cols], outs)


@emits("mean")
def _mean(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    _reduce_mean(b, ins[0], list(n.attrs["axes"]), n.attrs["keepdims"], outs[0])


@emits("softmax")
def _softmax(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    rank = b.graph.type_of(n.inputs[0]).rank
    axis = n.attrs["axis"] % rank
    if b.opset >= 13 or axis == rank - 1:
        b.add("Softmax", ins, outs, axis=axis)
        return
    perm = list(range(rank))  # opset < 13 softmax flattens trailing dims: move the axis last and back
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = b.add("Transpose", ins, b.tmp("moved"), perm=perm)[0]
    sm = b.add("Softmax", [moved], b.tmp("softmax"), axis=rank - 1)[0]
    b.add("Transpose", [sm], outs, perm=perm)


@emits("resize")
def _resize(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    a = n.attrs
    x_t = b.graph.type_of(n.inputs[0])
    if a["mode"] == "nearest":
        style = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        style = {"mode": "linear",
                 "coordinate_transformation_mode": "align_corners" if a["align_corners"] else "half_pixel"}
    size = list(a["size"])
    # roi and scales are required inputs before opset 13 (empty tensors mean "use sizes")
    empty = ["", ""] if b.opset >= 13 else [b.const("roi", [], _dtype(n)), b.const("scales", [], np.float32)]
    if all(isinstance(d, int) for d in x_t.shape[:2]):
        b.add("Resize", [ins[0], *empty, b.ints("sizes", list(x_t.shape[:2]) + size)], outs, **style)
    elif b.opset >= 18:
        b.add("Resize", [ins[0], "", "", b.ints("sizes", size)], outs, axes=[2, 3], **style)
    else:  # symbolic batch before opset 18: sizes = concat(shape(x)[:2], [H, W]) at run time
        shape = b.add("Shape", ins[:1], b.tmp("shape"))[0]
        nc = b.add("Slice", [shape, b.ints("s0", [0]), b.ints("s2", [2])], b.tmp("nc"))[0]
        sizes = b.add("Concat", [nc, b.ints("hw", size)], b.tmp("sizes"), axis=0)[0]
        b.add("Resize", [ins[0], *empty, sizes], outs, **style)


# ---- quantization ---------------------------------------------------------------------------------

#: first opset whose QuantizeLinear/DequantizeLinear take a per-axis (1-D) scale
PER_AXIS_OPSET = 13


def _along(b: _Builder, v: str, axis: int, rank: int, suffix: str) -> str:
    """A [C] value reshaped to [C, 1, ...] so that it broadcasts along `axis` of a rank-`rank` tensor."""
    return b.add("Reshape", [v, b.ints(f"{suffix}_shape", [-1] + [1] * (rank - 1 - axis))], b.tmp(suffix))[0]


def _to_float(b: _Builder, x: str, suffix: str) -> str:
    """x cast to float32, rounding as the interpreter's .float() does (exactly below 2^24)."""
    return b.add("Cast", [x], b.tmp(suffix), to=onnx.TensorProto.FLOAT)[0]


def _qdq_axis(b: _Builder, n: Node) -> int | None:
    """The channel axis of a per-axis quantize/dequantize, or None when it is per-tensor (scalar scale)."""
    if b.graph.type_of(n.inputs[1]).rank == 0:
        return None
    return n.attrs["axis"] % b.graph.type_of(n.inputs[0]).rank


@emits("quantize")
def _quantize(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    x_t, axis = b.graph.type_of(n.inputs[0]), _qdq_axis(b, n)
    x = ins[0] if x_t.dtype == "float32" else _to_float(b, ins[0], "f32")  # the interpreter quantizes float32
    if axis is None or b.opset >= PER_AXIS_OPSET:
        b.add("QuantizeLinear", [x, ins[1], ins[2]], outs, axis=axis)
        return
    # per-axis before opset 13: the definition itself, saturate(round_half_even(x / scale) + zero_point)
    lo, hi = ops.QUANT_DTYPES[n.out_types[0].dtype]
    scaled = b.add("Div", [x, _along(b, ins[1], axis, x_t.rank, "scale")], b.tmp("scaled"))[0]
    rounded = b.add("Round", [scaled], b.tmp("rounded"))[0]
    zp = _to_float(b, _along(b, ins[2], axis, x_t.rank, "zero_point"), "zero_point_f32")
    shifted = b.add("Add", [rounded, zp], b.tmp("shifted"))[0]
    clipped = b.tmp("saturated")
    _clip(b, shifted, np.dtype(np.float32), float(lo), float(hi), clipped)
    b.add("Cast", [clipped], outs, to=_ONNX_DTYPES[n.out_types[0].dtype])


@emits("dequantize")
def _dequantize(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    axis = _qdq_axis(b, n)
    if axis is None or b.opset >= PER_AXIS_OPSET:
        b.add("DequantizeLinear", ins, outs, axis=axis)
        return
    rank = b.graph.type_of(n.inputs[0]).rank  # per-axis before opset 13: (x - zero_point) * scale in float32
    zp = _to_float(b, _along(b, ins[2], axis, rank, "zero_point"), "zero_point_f32")
    centered = b.add("Sub", [_to_float(b, ins[0], "f32"), zp], b.tmp("centered"))[0]
    b.add("Mul", [centered, _along(b, ins[1], axis, rank, "scale")], outs)


def _requantized(b: _Builder, n: Node, outs: list[str], core: Callable[[str], None]) -> None:
    """`core` computes the float32 value v; then act(v) and, for an integer out_dtype, QuantizeLinear to its grid."""
    a = n.attrs
    as_float = n.replace(out_types=tuple(TensorType(t.shape, "float32") for t in n.out_types))
    if a["out_dtype"] == "float32":
        _with_activation(b, as_float, outs, core)
        return
    v = b.tmp("dequantized")
    _with_activation(b, as_float, [v], core)
    zp = b.const("out_zero_point", a["out_zero_point"], np.dtype(a["out_dtype"]))
    b.add("QuantizeLinear", [v, b.const("out_scale", a["out_scale"], np.float32), zp], outs)


def _scaled_accumulator(b: _Builder, acc: str, bias: str, scale: str, axis: int, rank: int, out: str) -> None:
    """float32(acc + bias) * scale per channel on `axis`: the int32 accumulator dequantized as the interpreter does."""
    if axis != rank - 1:
        bias, scale = _along(b, bias, axis, rank, "bias"), _along(b, scale, axis, rank, "scale")
    biased = b.add("Add", [acc, bias], b.tmp("biased"))[0]
    b.add("Mul", [_to_float(b, biased, "acc_f32"), scale], out)


def _zero_point_padded(b: _Builder, n: Node, x: str) -> str:
    """x padded by the conv's [top, left, bottom, right] with x_zero_point, as the integer conv defines padding."""
    top, left, bottom, right = n.attrs["padding"]
    if not any((top, left, bottom, right)):
        return x
    x_t = b.graph.type_of(n.inputs[0])
    zp = n.attrs["x_zero_point"]
    lo, hi = ops.QUANT_DTYPES[x_t.dtype]
    if not lo <= zp <= hi:
        raise b.error(f"x_zero_point={zp} does not fit the {x_t.dtype} input, so its padding has no {x_t.dtype} "
                      f"value in ONNX; use a zero point in [{lo}, {hi}]")
    pads, value = b.ints("pads", [0, 0, top, left, 0, 0, bottom, right]), b.const("x_zero_point", zp, x_t.dtype)
    return b.add("Pad", [x, pads, value], b.tmp("padded"), mode="constant")[0]


def _as_uint8(b: _Builder, x: str, dtype: str, suffix: str) -> tuple[str, str]:
    """An 8-bit operand as uint8 plus the zero point restoring it (int8 v is stored as v + 128, exactly).

    ONNX Runtime's u8 x s8 integer kernels may saturate int16 pair sums on x86 CPUs without VNNI (its quantization
    docs); u8 x u8 with zero points accumulates exactly everywhere, and the integer ops promise exact int32 sums.
    """
    if dtype == "uint8":
        return x, b.const(f"{suffix}_zero_point", 0, np.uint8)
    if dtype not in ("int8",):
        raise b.error(f"its {dtype} operand has no ONNX integer conv/matmul (ConvInteger and MatMulInteger take 8-bit "
                      "inputs); a uint16 activation comes from quant-fallback{to=int16}: export before that pass, use "
                      "to=float, or ship the TVM artifact")
    wide = b.add("Cast", [x], b.tmp(f"{suffix}_i32"), to=onnx.TensorProto.INT32)[0]
    shifted = b.add("Add", [wide, b.const(f"{suffix}_offset", 128, np.int32)], b.tmp(f"{suffix}_shifted"))[0]
    u8 = b.add("Cast", [shifted], b.tmp(f"{suffix}_u8"), to=onnx.TensorProto.UINT8)[0]
    return u8, b.const(f"{suffix}_zero_point", 128, np.uint8)


def _integer_operands(b: _Builder, n: Node, x: str, w: str) -> list[str]:
    """[x, w, x_zero_point, w_zero_point] of ConvInteger/MatMulInteger computing the plain sum of x * w."""
    x_u8, x_zp = _as_uint8(b, x, b.graph.type_of(n.inputs[0]).dtype, "x")
    w_u8, w_zp = _as_uint8(b, w, b.graph.type_of(n.inputs[1]).dtype, "w")
    return [x_u8, w_u8, x_zp, w_zp]


@emits("qconv2d")
def _qconv2d(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    a = n.attrs
    k = b.graph.type_of(n.inputs[1]).shape[2:]

    def core(y: str) -> None:  # ConvInteger: exact int32 sums over the zero-point-padded input
        operands = _integer_operands(b, n, _zero_point_padded(b, n, ins[0]), ins[1])
        acc = b.add("ConvInteger", operands, b.tmp("acc"), kernel_shape=list(k), strides=list(a["stride"]),
                    dilations=list(a["dilation"]), group=a["groups"])[0]
        _scaled_accumulator(b, acc, ins[2], ins[3], 1, 4, y)

    _requantized(b, n, outs, core)


@emits("qdense")
def _qdense(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    rank = b.graph.type_of(n.inputs[0]).rank

    def core(y: str) -> None:  # MatMulInteger with the [in, out] weight: exact int32 sums
        wt = b.add("Transpose", [ins[1]], b.tmp("wT"), perm=[1, 0])[0]
        acc = b.add("MatMulInteger", _integer_operands(b, n, ins[0], wt), b.tmp("acc"))[0]
        _scaled_accumulator(b, acc, ins[2], ins[3], rank - 1, rank, y)

    _requantized(b, n, outs, core)


@emits("qadd")
def _qadd(b: _Builder, n: Node, ins: list[str], outs: list[str]) -> None:
    a = n.attrs

    def dequantized(x: str, key: str) -> str:
        """(x - zp) * scale in float32; not DequantizeLinear, which ORT would fuse with Add and Q into QLinearAdd."""
        zp = b.const(f"{key}_zero_point", float(a[f"{key}_zero_point"]), np.float32)
        centered = b.add("Sub", [_to_float(b, x, f"{key}_f32"), zp], b.tmp(f"{key}_centered"))[0]
        return b.add("Mul", [centered, b.const(f"{key}_scale", a[f"{key}_scale"], np.float32)], b.tmp(key))[0]

    _requantized(b, n, outs, lambda y: b.add("Add", [dequantized(ins[0], "a"), dequantized(ins[1], "b")], y))


# ---- whole graphs ---------------------------------------------------------------------------------

_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
                "float64": onnx.TensorProto.DOUBLE, "int64": onnx.TensorProto.INT64,
                "int32": onnx.TensorProto.INT32, "int16": onnx.TensorProto.INT16, "int8": onnx.TensorProto.INT8,
                "uint8": onnx.TensorProto.UINT8, "uint16": onnx.TensorProto.UINT16, "bool": onnx.TensorProto.BOOL}


def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    """A typed ONNX value; symbolic dims become dim_param."""
    return helper.make_tensor_value_info(name, _ONNX_DTYPES[t.dtype], list(t.shape))


def _initializers(graph: Graph) -> list[onnx.TensorProto]:
    missing = [p for p in graph.param_types if p not in graph.weights]
    if missing:
        raise ExportError(f"cannot export graph {graph.name} to ONNX: parameter(s) {', '.join(missing[:5])} have no "
                          f"weight data; load the graph with its weights (slimc.ir.load) before exporting.")
    return [numpy_helper.from_array(np.ascontiguousarray(graph.weights[p]), p) for p in graph.param_types]


def _outputs(b: _Builder) -> list[onnx.ValueInfoProto]:
    """Graph outputs; inputs, parameters and repeated values are routed through an Identity first."""
    direct = {o for n in b.graph.nodes for o in n.outputs}
    seen: set[str] = set()
    infos = []
    for o in b.graph.outputs:
        name = o
        if o not in direct or o in seen:
            b.current = Node(f"{o}.out", "identity", (o,), {}, (b.graph.type_of(o),))
            name = b.add("Identity", [o], b.fresh(f"{o}.out"))[0]
        seen.add(o)
        infos.append(_value_info(name, b.graph.type_of(o)))
    return infos


def to_onnx(graph: Graph, path: str | os.PathLike[str] | None = None, opset: int = 17) -> onnx.ModelProto:
    """The graph as an ONNX model (checked with onnx.checker); written atomically to `path` if given."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"cannot export graph {graph.name}: ONNX opset {opset} is outside the supported range "
                          f"{MIN_OPSET}–{MAX_OPSET}.")
    inits = _initializers(graph)
    b = _Builder(graph, opset)
    b.taken.update(graph.value_types)
    b.taken.update(n.name for n in graph.nodes)
    for node in graph.nodes:
        b.current = node
        _emit_node(b, node, list(node.inputs), list(node.outputs))
    outputs = _outputs(b)
    b.current = None
    produced = {o for n in graph.nodes for o in n.outputs} - set(graph.outputs)
    value_info = [_value_info(v, graph.type_of(v)) for v in graph.value_types if v in produced]
    g = helper.make_graph(b.nodes, graph.name, [_value_info(n, t) for n, t in graph.inputs], outputs,
                          inits + b.initializers, value_info=value_info)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="slimc",
                              ir_version=helper.find_min_ir_version_for(opsets))
    model.doc_string = f"exported by slimc from IR graph {graph.name}"
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ExportError(f"the ONNX model exported from graph {graph.name} fails onnx.checker: "
                          f"{str(e).splitlines()[0]}; please report this as a slimc bug.") from None
    if path is not None:
        data = model.SerializeToString()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        try:
            _write_atomically(path, write)
        except OSError as e:
            raise ExportError(f"cannot write ONNX model to {os.fspath(path)}: {e}") from None
    return model


# ---- torch.export ---------------------------------------------------------------------------------

def _dim_name(symbol: str) -> str:
    """torch.export.Dim names must be Python identifiers; IR symbols may be any string."""
    name = re.sub(r"\W", "_", symbol)
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"dim_{name}"


def _dynamic_spec(graph: Graph) -> tuple[tuple[Any, ...], tuple[dict[int, Any], ...]]:
    """Example tensors (symbolic dims set to 2) and torch.export dynamic shapes (one Dim per symbol)."""
    import torch

    dims: dict[str, Any] = {}
    examples, specs = [], []
    for _, t in graph.inputs:
        shape, spec = [], {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                spec[i] = dims.setdefault(d, torch.export.Dim(_dim_name(d)))
                shape.append(2)
            else:
                shape.append(d)
        dt = getattr(torch, t.dtype)
        examples.append(torch.randn(shape).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
        specs.append(spec)
    return tuple(examples), tuple(specs)


def to_pt2(graph: Graph, path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Save the graph as a torch.export program (loads with torch.export.load, no slimc needed); atomic."""
    import torch

    from slimc.interpreter import GraphModule

    try:
        module = GraphModule(graph).eval()
    except IRError as e:
        raise ExportError(f"cannot export graph {graph.name} to .pt2: {e}") from None
    examples, specs = _dynamic_spec(graph)
    dynamic = (specs,) if any(specs) else None  # forward(*inputs): one entry for the var-positional tuple
    try:
        with torch.no_grad():
            program = torch.export.export(module, examples, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch.export raises many error types (guards, unsupported ops, kernel errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.export failed on graph {graph.name} ({type(e).__name__}: {first}). With a "
                          f"symbolic batch, every op must work for any batch size; re-import with a static "
                          f"shape if the graph fixes the batch.") from None
    try:
        _write_atomically(path, lambda tmp: torch.export.save(program, tmp))
    except OSError as e:
        raise ExportError(f"cannot write {os.fspath(path)}: {e}") from None
    return program
