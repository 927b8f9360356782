"""IR -> Relax with our own emitter: channel-blocked conv layouts with pre-packed weights, padding as its own op."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from slimc.errors import SlimcError
from slimc.ir import Graph, Node
from slimc.targets import kernel_map


class LoweringError(SlimcError):
    """The graph cannot be lowered for this target (unsupported op, symbolic shape, ...)."""


@dataclass(frozen=True)
class Val:
    """A lowered value: its Relax expression and channel block (0 = plain layout; b > 0 = NCHW[b]c).

    `channels` > 0: a kernel wrote the value with its channels padded to that many (an int8 conv's whole 16-channel
    blocks); the padding holds no data, and `Lowerer.value` hands it out only to readers that ask for it.
    """

    expr: object
    block: int = 0
    channels: int = 0


@dataclass(frozen=True)
class LayoutPlan:
    """Channel-block policy: `block` is the preferred channels-per-vector (0 disables blocking)."""

    block: int

    def block_for(self, channels: int) -> int:
        """Largest divisor of `channels` that is at most the preferred block (so no channel padding is needed)."""
        if self.block <= 0:
            return 0
        for d in range(min(self.block, channels), 0, -1):
            if channels % d == 0:
                return d
        return 1


LowerFn = Callable[["Lowerer", Node], Sequence[Val]]
LOWERINGS: dict[str, LowerFn] = {}


def lowering(*ops: str) -> Callable[[LowerFn], LowerFn]:
    """Register how IR ops become Relax."""

    def deco(fn: LowerFn) -> LowerFn:
        for op in ops:
            LOWERINGS[op] = fn
        return fn

    return deco


class Lowerer:
    """Walks the graph once, emitting Relax through a BlockBuilder and tracking each value's layout."""

    def __init__(self, graph: Graph, target, plan: LayoutPlan, target_info=None) -> None:
        from tvm import relax

        self.graph, self.target, self.plan = graph, target, plan
        self.target_info = target_info  # the slimc Target (ISA features), when known
        self.relax = relax
        self.bb = _recording_builder()()
        self.env: dict[str, Val] = {}
        self._converted: dict[tuple[str, int], Val] = {}

    # ---- values and layouts -------------------------------------------------------------------
    def const(self, array: np.ndarray):
        return self.relax.const(np.ascontiguousarray(array), str(array.dtype))

    def value(self, name: str, block: int | None = None, padded: bool = False) -> Val:
        """The value in plain layout (block=0), a given block, or as it is (None; with `padded`, channel padding
        included: for readers whose padded channels multiply zero weights)."""
        if name not in self.env:
            if self.graph.is_param(name):
                self.env[name] = Val(self.const(self.graph.weight(name)))
            else:
                raise LoweringError(f"value %{name} used before it was lowered")
        v = self.env[name]
        if v.channels and not (padded and block is None):
            return self._unpadded(name, v, block or 0)
        if block is None or v.block == block:
            return v
        key = (name, block)
        if key not in self._converted:
            self._converted[key] = Val(self._relayout(v, block), block)
        return self._converted[key]

    def _unpadded(self, name: str, v: Val, block: int) -> Val:
        """A channel-padded value with its true channels, plain (sliced) or in `block` (from plain)."""
        from tvm.relax import op as R

        key = (name, block)
        if key not in self._converted:
            if block:
                self._converted[key] = Val(self._relayout(self._unpadded(name, v, 0), block), block)
            else:
                plain = self._relayout(v, 0)
                self._converted[key] = self.emit(R.strided_slice(plain, [1], [0], [self.graph.type_of(name).shape[1]]))
        return self._converted[key]

    def in_layout(self, v: Val, block: int):
        """An unnamed value's expression in the given layout (0 = plain NCHW)."""
        return v.expr if v.block == block else self._relayout(v, block)

    def expr(self, name: str, block: int | None = 0):
        return self.value(name, block).expr

    def _relayout(self, v: Val, block: int):
        from tvm.relax import op as R

        x = v.expr
        if v.block:
            b = v.block
            x = self.bb.emit(R.layout_transform(x, index_map=lambda n, cb, h, w, ci: (n, cb * b + ci, h, w)))
        if block:
            x = self.bb.emit(R.layout_transform(x, index_map=lambda n, c, h, w: (n, c // block, h, w, c % block)))
        return x

    def emit(self, expr, block: int = 0) -> Val:
        return Val(self.bb.emit(expr), block)

    def channel_const(self, vec: np.ndarray, block: int, dtype: str = "float32"):
        """A per-channel vector shaped to broadcast over NCHW ([1,C,1,1]) or NCHW[b]c ([1,C/b,1,1,b])."""
        vec = np.asarray(vec, dtype)
        if block:
            return self.const(vec.reshape(1, -1, 1, 1, block))
        return self.const(vec.reshape(1, -1, 1, 1))

    def is_plain_4d(self, name: str) -> bool:
        return self.graph.type_of(name).rank == 4

    # ---- driver --------------------------------------------------------------------------------
    def run(self):
        relax = self.relax
        params = []
        for name, t in self.graph.inputs:
            if not t.is_static:
                raise LoweringError(f"input %{name} has symbolic shape {t}; compile needs static shapes "
                                    "(re-import with --input-shape)")
            var = relax.Var(name, relax.TensorType(tuple(t.shape), t.dtype))
            params.append(var)
            self.env[name] = Val(var)
        ends: list[tuple[str, object]] = []  # (node, the last binding its lowering emitted)
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in self.graph.nodes:
                    fn = LOWERINGS.get(node.op)
                    if fn is None:
                        raise LoweringError(f"node {node.name}: op {node.op} has no TVM lowering yet; supported: "
                                            f"{', '.join(sorted(LOWERINGS))}")
                    before = self.bb.last
                    self.env.update(zip(node.outputs, fn(self, node)))
                    if self.bb.last is not before:
                        ends.append((node.name, self.bb.last))
                outs = []
                for o in self.graph.outputs:  # converting an output to plain layout is its producer's work
                    before = self.bb.last
                    outs.append(self.expr(o, 0))
                    if self.bb.last is not before and (producer := self.graph.producer(o)) is not None:
                        ends.append((producer.name, self.bb.last))
                result = self.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
            self.bb.emit_func_output(result)
        mod = self.bb.get()
        return mod.with_attr(kernel_map.ORIGINS, kernel_map.binding_origins(mod["main"], ends))


@functools.cache
def _recording_builder() -> type:
    """A BlockBuilder that remembers the last binding it emitted: where each IR node's bindings end."""
    from tvm import relax

    class RecordingBlockBuilder(relax.BlockBuilder):
        last = None

        def emit(self, expr, name_hint: str = ""):
            self.last = super().emit(expr, name_hint)
            return self.last

    return RecordingBlockBuilder


def lower(graph: Graph, target, plan: LayoutPlan | None = None):
    """Lower a graph (fp32, or integer after fold-qdq) to a Relax IRModule with a `main` function taking the graph inputs."""
    if plan is None:
        plan = default_plan(target)
    if hasattr(target, "tvm"):
        return Lowerer(graph, target.tvm(), plan, target).run()
    return Lowerer(graph, target, plan).run()


def default_plan(target) -> LayoutPlan:
    """NCHW[x]c with x = fp32 lanes per vector register on targets with wide SIMD, plain NCHW otherwise."""
    block = getattr(target, "channel_block", 0)
    return LayoutPlan(block if block >= 4 else 0)


# ---- activations -----------------------------------------------------------------------------------

def clamp_bounds(act: str, attrs) -> tuple[float | None, float | None] | None:
    """(low, high) of an activation that is a clamp (relu, relu6, clip; None = unbounded), else None."""
    if act == "relu":
        return 0.0, None
    if act == "relu6":
        return 0.0, 6.0
    if act == "clip":
        return attrs.get("clip_min", attrs.get("min")), attrs.get("clip_max", attrs.get("max"))
    return None


def activation(lw: Lowerer, x, act: str, attrs) -> object:
    """Emit an activation on a Relax expression (layout-agnostic)."""
    from tvm.relax import op as R

    bb = lw.bb
    if act in ("none", "identity", "dropout"):
        return x
    if act == "relu":
        return bb.emit(R.nn.relu(x))
    if act in ("relu6", "clip"):
        lo, hi = clamp_bounds(act, attrs)
        return bb.emit(R.clip(x, -3.4e38 if lo is None else lo, 3.4e38 if hi is None else hi))
    if act == "hardswish":
        r = bb.emit(R.clip(R.add(x, lw.const(np.float32(3.0))), 0.0, 6.0))
        return bb.emit(R.multiply(x, R.multiply(r, lw.const(np.float32(1.0 / 6.0)))))
    if act == "hardsigmoid":
        a, b = attrs.get("alpha", 1.0 / 6.0), attrs.get("beta", 0.5)
        return bb.emit(R.clip(R.add(R.multiply(x, lw.const(np.float32(a))), lw.const(np.float32(b))), 0.0, 1.0))
    if act == "sigmoid":
        return bb.emit(R.sigmoid(x))
    if act == "silu":
        return bb.emit(R.nn.silu(x))
    if act == "gelu":
        tanh = attrs.get("approximate", "none") == "tanh"
        return bb.emit(R.nn.gelu_tanh(x) if tanh else R.nn.gelu(x))
    simple = {"tanh": R.tanh, "exp": R.exp, "sqrt": R.sqrt, "neg": R.negative, "erf": R.erf}
    if act in simple:
        return bb.emit(simple[act](x))
    raise LoweringError(f"activation {act} has no TVM lowering")


@lowering("identity", "dropout", "relu", "relu6", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu",
          "tanh", "exp", "sqrt", "neg", "erf")
def _unary(lw: Lowerer, n: Node):
    v = lw.value(n.inputs[0])
    return [Val(activation(lw, v.expr, n.op, n.attrs), v.block)]


# ---- convolution and dense ---------------------------------------------------------------------

def _pack_conv_weight(w: np.ndarray, ib: int, ob: int) -> np.ndarray:
    """OIHW -> [O/ob, I/ib, KH, KW, ib, ob] (topi conv2d_NCHWc's kernel layout)."""
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o // ob, ob, i // ib, ib, kh, kw).transpose(0, 2, 4, 5, 3, 1))


def _pack_depthwise_weight(w: np.ndarray, b: int) -> np.ndarray:
    """[C,1,KH,KW] -> [C/b, 1, KH, KW, 1, b] (topi depthwise_conv2d_NCHWc's kernel layout)."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c // b, b, kh, kw).transpose(0, 2, 3, 1)[:, None, :, :, None, :])


def depthwise_nchwc_te(data, kernel, stride: Sequence[int], dilation: Sequence[int], out_dtype: str,
                       padding: Sequence[int] = (0, 0, 0, 0), pad_value: float = 0.0):
    """Depthwise conv on NCHW[b]c data with a [C/b,1,KH,KW,1,b] kernel (TVM 0.27 has no generic one); `padding`
    (top, left, bottom, right) is a stage of the same kernel, which the template inlines into the conv's loads."""
    from tvm import te, tirx

    from slimc.targets.schedules import DEPTHWISE_BLOCK, DEPTHWISE_PAD_BLOCK

    if any(padding):
        top, left, bottom, right = padding
        n, cb, h, w, b = data.shape
        src = data
        data = te.compute(
            (n, cb, h + top + bottom, w + left + right, b),
            lambda i, c, y, x, k: tirx.if_then_else(
                tirx.all(y >= top, y < h + top, x >= left, x < w + left), src[i, c, y - top, x - left, k],
                tirx.const(pad_value, src.dtype)),
            name=DEPTHWISE_PAD_BLOCK)
    n, cb, h, w, b = data.shape
    _, _, kh, kw, _, _ = kernel.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (n, cb, oh, ow, b),
        lambda i, c, y, x, k: te.sum(
            data[i, c, y * sh + ry * dh, x * sw + rx * dw, k].astype(out_dtype)
            * kernel[c, 0, ry, rx, 0, k].astype(out_dtype), axis=[ry, rx]),
        name=DEPTHWISE_BLOCK)


def _spatial_pad(lw: Lowerer, x, padding: Sequence[int], rank: int, value: float = 0.0):
    """Padding as its own op (keeps a dense conv's loads simple for vectorization/tensorization; depthwise convs
    pad inside their kernel, see depthwise_nchwc_te)."""
    from tvm.relax import op as R

    top, left, bottom, right = padding
    if not any(padding):
        return x
    widths = [0, 0, 0, 0, top, bottom, left, right] + ([0, 0] if rank == 5 else [])
    return lw.bb.emit(R.nn.pad(x, widths, "constant", value))


@lowering("conv2d")
def _conv2d(lw: Lowerer, n: Node):
    from tvm import topi
    from tvm.relax import op as R

    g = lw.graph
    x_t, w_t = g.type_of(n.inputs[0]), g.type_of(n.inputs[1])
    cin, cout = int(x_t.shape[1]), int(w_t.shape[0])
    groups = n.attrs["groups"]
    depthwise = groups == cin == cout and w_t.shape[1] == 1
    w = g.weight(n.inputs[1]) if g.is_param(n.inputs[1]) else None
    bias = g.weight(n.inputs[2]) if len(n.inputs) > 2 and g.is_param(n.inputs[2]) else None
    ib, ob = lw.plan.block_for(cin), lw.plan.block_for(cout)
    blocked = bool(lw.plan.block) and w is not None and (groups == 1 or depthwise) and (len(n.inputs) < 3 or bias is not None)
    if blocked:
        b = ob if depthwise else ib
        if depthwise:
            ib = ob = b
        x = lw.expr(n.inputs[0], ib)
        layout_in, layout_out = f"NCHW{ib}c", f"NCHW{ob}c"
        with lw.target:
            if depthwise:  # padding inside the kernel (depthwise_nchwc_te)
                y = lw.bb.emit_te(depthwise_nchwc_te, x, lw.const(_pack_depthwise_weight(w, b)),
                                  tuple(n.attrs["stride"]), tuple(n.attrs["dilation"]), "float32",
                                  tuple(n.attrs["padding"]), primfunc_name_hint="depthwise_conv2d_NCHWc")
            else:
                x = _spatial_pad(lw, x, n.attrs["padding"], 5)
                y = lw.bb.emit_te(topi.nn.conv2d_NCHWc, x, lw.const(_pack_conv_weight(w, ib, ob)),
                                  tuple(n.attrs["stride"]), (0, 0), tuple(n.attrs["dilation"]), layout_in, layout_out,
                                  "float32", primfunc_name_hint="conv2d_NCHWc")
        if bias is not None:
            y = lw.bb.emit(R.add(y, lw.channel_const(bias, ob)))
        return [Val(activation(lw, y, n.attrs["act"], n.attrs), ob)]
    x = lw.expr(n.inputs[0], 0)
    y = lw.bb.emit(R.nn.conv2d(x, lw.expr(n.inputs[1]), tuple(n.attrs["stride"]), tuple(n.attrs["padding"]),
                               tuple(n.attrs["dilation"]), groups))
    if len(n.inputs) > 2:
        y = lw.bb.emit(R.add(y, R.reshape(lw.expr(n.inputs[2]), (1, cout, 1, 1))))
    return [Val(activation(lw, y, n.attrs["act"], n.attrs))]


@lowering("dense")
def _dense(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    g = lw.graph
    x = lw.expr(n.inputs[0])
    if g.is_param(n.inputs[1]):
        wt = lw.const(np.ascontiguousarray(g.weight(n.inputs[1]).T))
    else:
        wt = lw.bb.emit(R.permute_dims(lw.expr(n.inputs[1]), [1, 0]))
    y = lw.bb.emit(R.matmul(x, wt))
    if len(n.inputs) > 2:
        y = lw.bb.emit(R.add(y, lw.expr(n.inputs[2])))
    return [Val(activation(lw, y, n.attrs["act"], n.attrs))]


@lowering("matmul")
def _matmul(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.matmul(lw.expr(n.inputs[0]), lw.expr(n.inputs[1])))]


@lowering("batch_norm")
def _batch_norm(lw: Lowerer, n: Node):
    """Inference batch norm as a per-channel scale and shift (constants folded here, in float64)."""
    from tvm.relax import op as R

    g = lw.graph
    if not all(g.is_param(i) for i in n.inputs[1:]) or g.type_of(n.inputs[0]).rank != 4:
        raise LoweringError(f"node {n.name}: batch_norm needs constant statistics and an NCHW input")
    gamma, beta, mean, var = (g.weight(i).astype(np.float64) for i in n.inputs[1:])
    scale = gamma / np.sqrt(var + n.attrs["eps"])
    shift = beta - mean * scale
    v = lw.value(n.inputs[0])
    y = lw.bb.emit(R.add(R.multiply(v.expr, lw.channel_const(scale, v.block)), lw.channel_const(shift, v.block)))
    return [Val(y, v.block)]


@lowering("layer_norm")
def _layer_norm(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    t = lw.graph.type_of(n.inputs[0])
    axis = n.attrs["axis"] % t.rank
    norm_shape = tuple(int(d) for d in t.shape[axis:])
    gamma = lw.expr(n.inputs[1]) if len(n.inputs) > 1 else lw.const(np.ones(norm_shape, np.float32))
    beta = lw.expr(n.inputs[2]) if len(n.inputs) > 2 else lw.const(np.zeros(norm_shape, np.float32))
    return [lw.emit(R.nn.layer_norm(lw.expr(n.inputs[0]), gamma, beta, list(range(axis, t.rank)), n.attrs["eps"]))]


# ---- elementwise binary ------------------------------------------------------------------------

_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide", "pow": "power"}


@lowering(*_BINARY)
def _binary(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    fn = getattr(R, _BINARY[n.op])
    a, b = (lw.value(i) for i in n.inputs)
    ta, tb = (lw.graph.type_of(i) for i in n.inputs)
    # stay blocked when both sides are 4-D tensors of the output's shape class and share a block,
    # or when one side is a scalar
    if a.block and b.block and a.block == b.block and ta.rank == tb.rank == 4:
        return [lw.emit(fn(a.expr, b.expr), a.block)]
    for blocked, other, t_other in ((a, b, tb), (b, a, ta)):
        if blocked.block and t_other.numel() == 1 and not other.block:
            scalar = lw.bb.emit(R.reshape(other.expr, ())) if t_other.rank else other.expr
            args = (blocked.expr, scalar) if blocked is a else (scalar, blocked.expr)
            return [lw.emit(fn(*args), blocked.block)]
    return [lw.emit(fn(lw.expr(n.inputs[0]), lw.expr(n.inputs[1])))]


# ---- data movement -------------------------------------------------------------------------------

@lowering("concat")
def _concat(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    axis = n.attrs["axis"] % n.out_types[0].rank
    vals = [lw.value(i) for i in n.inputs]
    b = vals[0].block
    if axis == 1 and b and all(v.block == b for v in vals):
        return [lw.emit(R.concat([v.expr for v in vals], axis=1), b)]
    return [lw.emit(R.concat([lw.expr(i) for i in n.inputs], axis=axis))]


@lowering("split")
def _split(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    axis = n.attrs["axis"] % lw.graph.type_of(n.inputs[0]).rank
    sizes = list(n.attrs["sizes"])
    v = lw.value(n.inputs[0])
    block = v.block if axis == 1 and v.block and all(s % v.block == 0 for s in sizes) else 0
    x = v.expr if block else lw.expr(n.inputs[0])
    unit = block or 1
    bounds = list(np.cumsum([s // unit for s in sizes])[:-1])
    parts = lw.bb.emit(R.split(x, [int(i) for i in bounds], axis=axis))
    return [Val(lw.bb.emit(lw.relax.TupleGetItem(parts, i)), block) for i in range(len(sizes))]


@lowering("slice")
def _slice(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    a = n.attrs
    return [lw.emit(R.strided_slice(lw.expr(n.inputs[0]), [a["axis"]], [a["start"]], [a["end"]], [a["step"]]))]


@lowering("reshape")
def _reshape(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.reshape(lw.expr(n.inputs[0]), tuple(int(d) for d in n.out_types[0].shape)))]


@lowering("flatten")
def _flatten(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.reshape(lw.expr(n.inputs[0]), tuple(int(d) for d in n.out_types[0].shape)))]


@lowering("transpose")
def _transpose(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.permute_dims(lw.expr(n.inputs[0]), list(n.attrs["perm"])))]


@lowering("channel_shuffle")
def _shuffle(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    shape = tuple(int(d) for d in n.out_types[0].shape)
    g = n.attrs["groups"]
    x = lw.bb.emit(R.reshape(lw.expr(n.inputs[0]), (shape[0], g, shape[1] // g) + shape[2:]))
    x = lw.bb.emit(R.permute_dims(x, [0, 2, 1] + list(range(3, len(shape) + 1))))
    return [lw.emit(R.reshape(x, shape))]


@lowering("pad")
def _pad(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    p, r = n.attrs["pads"], n.out_types[0].rank
    widths = [w for i in range(r) for w in (p[i], p[i + r])]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "edge"}[n.attrs["mode"]]
    return [lw.emit(R.nn.pad(lw.expr(n.inputs[0]), widths, mode, n.attrs["value"]))]


# ---- pooling and reductions ------------------------------------------------------------------------

@lowering("max_pool2d", "avg_pool2d")
def _pool(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    v = lw.value(n.inputs[0])
    a = n.attrs
    layout = f"NCHW{v.block}c" if v.block else "NCHW"
    if n.op == "max_pool2d":
        y = R.nn.max_pool2d(v.expr, tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]),
                            a["ceil_mode"], layout=layout)
    else:
        y = R.nn.avg_pool2d(v.expr, tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"]), (1, 1),
                            a["ceil_mode"], a["count_include_pad"], layout=layout)
    return [lw.emit(y, v.block)]


@lowering("global_avg_pool")
def _gap(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    v = lw.value(n.inputs[0])
    if n.out_type.dtype != "float32":
        return [lw.emit(R.mean(v.expr, axis=[2, 3], keepdims=True), v.block)]
    # summed in float64 like the interpreter: the float32 mean is then the same whatever order the kernel sums in
    # (an int8 model's requantized pool output would otherwise differ by a grid step now and then)
    y = lw.bb.emit(R.mean(R.astype(v.expr, "float64"), axis=[2, 3], keepdims=True))
    return [lw.emit(R.astype(y, "float32"), v.block)]


@lowering("adaptive_avg_pool2d")
def _aap(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.nn.adaptive_avg_pool2d(lw.expr(n.inputs[0]), tuple(n.attrs["output_size"])))]


@lowering("mean")
def _mean(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.mean(lw.expr(n.inputs[0]), axis=list(n.attrs["axes"]), keepdims=n.attrs["keepdims"]))]


@lowering("softmax")
def _softmax(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    return [lw.emit(R.nn.softmax(lw.expr(n.inputs[0]), axis=n.attrs["axis"]))]


@lowering("resize")
def _resize(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    a = n.attrs
    if a["mode"] == "nearest":
        y = R.image.resize2d(lw.expr(n.inputs[0]), tuple(a["size"]), method="nearest_neighbor",
                             coordinate_transformation_mode="asymmetric", rounding_method="floor")
    else:
        mode = "align_corners" if a["align_corners"] else "half_pixel"
        y = R.image.resize2d(lw.expr(n.inputs[0]), tuple(a["size"]), method="linear",
                             coordinate_transformation_mode=mode)
    return [lw.emit(y)]


from slimc.targets import lower_quant  # noqa: E402,F401  (registers the quantization ops' lowerings)
