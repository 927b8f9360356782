"""Runs a Graph with torch functional ops; differentiable w.r.t. parameters (calibration, distillation, export)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimc.errors import IRError, ShapeError
from slimc.ir import Graph, Node, TensorType

Kernel = Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*ops: str) -> Callable[[Kernel], Kernel]:
    """Register the torch implementation of one or more IR ops."""

    def deco(fn: Kernel) -> Kernel:
        for op in ops:
            KERNELS[op] = fn
        return fn

    return deco


def apply_activation(y: torch.Tensor, a: Mapping[str, Any]) -> torch.Tensor:
    """The fused epilogue of conv2d/dense (attribute act)."""
    act = a.get("act", "none")
    if act == "none":
        return y
    if act == "clip":
        return torch.clamp(y, a.get("clip_min"), a.get("clip_max"))
    return UNARY[act](y, {})


def _pad4(x: torch.Tensor, p: Sequence[int], value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Apply [top, left, bottom, right] padding; return the symmetric part to hand to the torch op."""
    top, left, bottom, right = p
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom), value=value), (0, 0)


@kernel("conv2d")
def _conv2d(x, a):
    inp, pad = _pad4(x[0], a["padding"])
    y = F.conv2d(inp, x[1], x[2] if len(x) > 2 else None, tuple(a["stride"]), pad, tuple(a["dilation"]), a["groups"])
    return apply_activation(y, a)


@kernel("dense")
def _dense(x, a):
    return apply_activation(F.linear(x[0], x[1], x[2] if len(x) > 2 else None), a)


@kernel("matmul")
def _matmul(x, a):
    return torch.matmul(x[0], x[1])


@kernel("batch_norm")
def _bn(x, a):
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a["eps"])


@kernel("layer_norm")
def _ln(x, a):
    ax = a["axis"] % x[0].dim()
    shape = tuple(x[0].shape[ax:])
    return F.layer_norm(x[0], shape, x[1] if len(x) > 1 else None, x[2] if len(x) > 2 else None, a["eps"])


UNARY: dict[str, Kernel] = {
    "identity": lambda x, a: x,
    "dropout": lambda x, a: x,
    "relu": lambda x, a: F.relu(x),
    "relu6": lambda x, a: F.relu6(x),
    "clip": lambda x, a: torch.clamp(x, a.get("min"), a.get("max")),
    "hardswish": lambda x, a: F.hardswish(x),
    "hardsigmoid": lambda x, a: torch.clamp(a.get("alpha", 1 / 6) * x + a.get("beta", 0.5), 0.0, 1.0),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "silu": lambda x, a: F.silu(x),
    "gelu": lambda x, a: F.gelu(x, approximate=a.get("approximate", "none")),
    "tanh": lambda x, a: torch.tanh(x),
    "exp": lambda x, a: torch.exp(x),
    "sqrt": lambda x, a: torch.sqrt(x),
    "neg": lambda x, a: -x,
    "erf": lambda x, a: torch.erf(x),
}
for _op, _fn in UNARY.items():
    KERNELS[_op] = (lambda fn: (lambda x, a: fn(x[0], a)))(_fn)

for _op, _fn in {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow}.items():
    KERNELS[_op] = (lambda fn: (lambda x, a: fn(x[0], x[1])))(_fn)


@kernel("concat")
def _concat(x, a):
    return torch.cat(list(x), dim=a["axis"])


@kernel("split")
def _split(x, a):
    return tuple(torch.split(x[0], list(a["sizes"]), dim=a["axis"]))


@kernel("slice")
def _slice(x, a):
    idx = [slice(None)] * x[0].dim()
    idx[a["axis"]] = slice(a["start"], a["end"], a["step"])
    return x[0][tuple(idx)]


@kernel("reshape")
def _reshape(x, a):
    shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(a["shape"])]
    return torch.reshape(x[0], shape)


@kernel("flatten")
def _flatten(x, a):
    return torch.flatten(x[0], a["start"], a["end"])


@kernel("transpose")
def _transpose(x, a):
    return x[0].permute(*a["perm"])


@kernel("pad")
def _pad(x, a):
    r = x[0].dim()
    p = a["pads"]
    torch_pads: list[int] = []
    for i in reversed(range(r)):
        torch_pads += [p[i], p[i + r]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[a["mode"]]
    if mode == "constant":
        return F.pad(x[0], torch_pads, mode="constant", value=a["value"])
    while torch_pads and torch_pads[-2:] == [0, 0]:  # torch's reflect/replicate pad only trailing dims
        torch_pads = torch_pads[:-2]
    return F.pad(x[0], torch_pads, mode=mode) if torch_pads else x[0]


@kernel("max_pool2d")
def _maxpool(x, a):
    t = x[0] if x[0].is_floating_point() else x[0].float()  # quantized max pool: exact on the integers
    inp, pad = _pad4(t, a["padding"], value=float("-inf"))
    y = F.max_pool2d(inp, tuple(a["kernel"]), tuple(a["stride"]), pad, tuple(a["dilation"]), a["ceil_mode"])
    return y.to(x[0].dtype)


@kernel("avg_pool2d")
def _avgpool(x, a):
    p = a["padding"]
    if p[0] != p[2] or p[1] != p[3]:
        if not a["count_include_pad"]:
            raise IRError("avg_pool2d: asymmetric padding with count_include_pad=false is not supported")
        inp, pad = F.pad(x[0], (p[1], p[3], p[0], p[2])), (0, 0)
    else:
        inp, pad = x[0], (p[0], p[1])
    return F.avg_pool2d(inp, tuple(a["kernel"]), tuple(a["stride"]), pad, a["ceil_mode"], a["count_include_pad"])


@kernel("global_avg_pool")
def _gap(x, a):
    if x[0].dtype == torch.float32:  # summed in float64: the float32 mean then does not depend on the order
        return x[0].double().mean(dim=(2, 3), keepdim=True).float()
    return x[0].mean(dim=(2, 3), keepdim=True)


@kernel("adaptive_avg_pool2d")
def _aap(x, a):
    return F.adaptive_avg_pool2d(x[0], tuple(a["output_size"]))


@kernel("mean")
def _mean(x, a):
    return x[0].mean(dim=tuple(a["axes"]), keepdim=a["keepdims"])


@kernel("softmax")
def _softmax(x, a):
    return torch.softmax(x[0], dim=a["axis"])


@kernel("resize")
def _resize(x, a):
    if a["mode"] == "nearest":
        return F.interpolate(x[0], size=tuple(a["size"]), mode="nearest")
    return F.interpolate(x[0], size=tuple(a["size"]), mode="bilinear", align_corners=a["align_corners"])


@kernel("channel_shuffle")
def _shuffle(x, a):
    t, g = x[0], a["groups"]
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, g, c // g, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


# ---- quantization --------------------------------------------------------------------------------

_QBOUNDS = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535)}


def _per_axis(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scalar or [C] quantization parameter shaped to broadcast along `axis` of x."""
    if v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def saturate(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lo, hi = _QBOUNDS[dtype]
    return torch.clamp(v, lo, hi).to(dtype)


@kernel("quantize")
def _quantize(x, a):
    s, z = _per_axis(x[1], x[0], a["axis"]), _per_axis(x[2], x[0], a["axis"])
    return saturate(torch.round(x[0].float() / s) + z.float(), x[2].dtype)


@kernel("dequantize")
def _dequantize(x, a):
    s, z = _per_axis(x[1], x[0], a["axis"]), _per_axis(x[2], x[0], a["axis"])
    return (x[0].float() - z.float()) * s


def requantize_epilogue(v: torch.Tensor, a: Mapping[str, Any]) -> torch.Tensor:
    """act(v), then float32 out or saturate(round_half_even(v / out_scale) + out_zero_point)."""
    v = apply_activation(v, a)
    if a["out_dtype"] == "float32":
        return v
    dt = _torch_dtype(a["out_dtype"])
    if a["out_scale"] != 1.0:
        v = v / torch.tensor(a["out_scale"], dtype=torch.float32)
    return saturate(torch.round(v) + a["out_zero_point"], dt)


def _per_channel(acc: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """(acc + bias) in exact int64, then times the float32 dequantization scale of each channel."""
    shape = [1] * acc.dim()
    shape[axis] = -1
    exact = torch.round(acc).to(torch.int64) + bias.to(torch.int64).reshape(shape)
    return exact.to(torch.int32).float() * scale.reshape(shape)


@kernel("qconv2d")
def _qconv2d(x, a):
    # float64 holds every u8 x s8 partial sum exactly (|acc| < 2^53), so this is the int32 conv
    top, left, bottom, right = a["padding"]
    inp = F.pad(x[0].double(), (left, right, top, bottom), value=float(a["x_zero_point"]))
    acc = F.conv2d(inp, x[1].double(), None, tuple(a["stride"]), 0, tuple(a["dilation"]), a["groups"])
    return requantize_epilogue(_per_channel(acc, x[2], x[3], 1), a)


@kernel("qdense")
def _qdense(x, a):
    acc = F.linear(x[0].double(), x[1].double())
    return requantize_epilogue(_per_channel(acc, x[2], x[3], acc.dim() - 1), a)


@kernel("qadd")
def _qadd(x, a):
    v = (x[0].float() - a["a_zero_point"]) * torch.tensor(a["a_scale"], dtype=torch.float32) \
        + (x[1].float() - a["b_zero_point"]) * torch.tensor(a["b_scale"], dtype=torch.float32)
    return requantize_epilogue(v, a)


def run_node(node: Node, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Execute one node; always returns a tuple of outputs."""
    fn = KERNELS.get(node.op)
    if fn is None:
        raise IRError(f"node {node.name}: the interpreter has no kernel for op {node.op}")
    out = fn(args, node.attrs)
    return out if isinstance(out, tuple) else (out,)


def _torch_dtype(dtype: str) -> torch.dtype:
    return getattr(torch, dtype)


def check_inputs(graph: Graph, arrays: Sequence[Any]) -> None:
    """Raise ShapeError if the given inputs do not fit the graph's input types."""
    if len(arrays) != len(graph.inputs):
        raise ShapeError(f"graph {graph.name} takes {len(graph.inputs)} input(s) "
                         f"({', '.join(graph.input_names)}), got {len(arrays)}")
    bound: dict[str, int] = {}
    for (name, t), arr in zip(graph.inputs, arrays):
        shape = tuple(arr.shape)
        ok = len(shape) == t.rank
        for d, s in zip(t.shape, shape) if ok else ():
            if isinstance(d, int):
                ok &= d == s
            else:
                ok &= bound.setdefault(d, s) == s
        if not ok:
            raise ShapeError(f"input %{name} of graph {graph.name} expects shape {t} but got "
                             f"{list(shape)}; pass data of that shape (or re-import with --input-shape)")


#: operand slots that hold statistics, not weights: never trained (torch also refuses gradients for them)
STATISTICS_SLOTS: dict[str, tuple[int, ...]] = {"batch_norm": (3, 4)}


def statistics_params(graph: Graph) -> set[str]:
    """Parameters used as running statistics (batch-norm mean/var)."""
    return {n.inputs[i] for n in graph.nodes for i in STATISTICS_SLOTS.get(n.op, ())
            if i < len(n.inputs) and graph.is_param(n.inputs[i])}


#: int8 weights stay on quantize's symmetric grid in fake-quant training (weight_qparams never writes -128)
WEIGHT_QMIN_INT8 = -127


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    """round-half-even forward, identity gradient (the straight-through estimator)."""
    return v + (torch.round(v) - v).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype,
                  axis: int) -> torch.Tensor:
    """quantize's integers as float: same forward, gradient 1 inside the grid and 0 where it saturates."""
    s, z = _per_axis(scale, x, axis), _per_axis(zero_point, x, axis)
    lo, hi = _QBOUNDS[dtype]
    return torch.clamp(_ste_round(x / s) + z.float(), lo, hi)


def weight_masters(graph: Graph) -> dict[str, Node]:
    """Integer weights read by a dequantize (QDQ weights), by value name: fake-quant trains float masters of them."""
    dtypes = {str(d).removeprefix("torch.") for d in _QBOUNDS}
    return {n.inputs[0]: n for n in graph.nodes
            if n.op == "dequantize" and n.inputs[0] in graph.weights
            and str(graph.weights[n.inputs[0]].dtype) in dtypes}


def quant_params(graph: Graph) -> set[str]:
    """Scales and zero points of quantize/dequantize nodes: fixed by calibration, not trained."""
    return {v for n in graph.nodes if n.op in ("quantize", "dequantize") for v in n.inputs[1:] if graph.is_param(v)}


class GraphModule(torch.nn.Module):
    """A Graph as an nn.Module: weights are Parameters (float) or buffers (integer), forward runs the nodes.

    With fake_quant (quantization-aware training of a QDQ graph), quantize outputs its integers as float with a
    straight-through gradient and each integer weight becomes a float master Parameter (initialized to its
    dequantized value) that is put back on its int8 grid in the forward pass and by to_graph; scales stay fixed.
    """

    def __init__(self, graph: Graph, trainable: bool = False, fake_quant: bool = False) -> None:
        super().__init__()
        self.graph = graph
        self.fake_quant = fake_quant
        self._names: dict[str, str] = {}
        self._masters = weight_masters(graph) if fake_quant else {}
        frozen = statistics_params(graph) | (quant_params(graph) if fake_quant else set())
        for i, (name, arr) in enumerate(graph.weights.items()):
            key = f"p{i}"
            self._names[name] = key
            t = torch.from_numpy(np.ascontiguousarray(arr)).reshape(np.shape(arr))  # ascontiguousarray makes 0-d 1-d
            if name in self._masters:
                dq = self._masters[name]
                t = KERNELS["dequantize"]([t, *(torch.from_numpy(np.asarray(graph.weights[v])) for v in dq.inputs[1:])],
                                          dq.attrs)
            if t.is_floating_point():
                grad = trainable and name not in frozen
                self.register_parameter(key, torch.nn.Parameter(t.clone(), requires_grad=grad))
            else:
                self.register_buffer(key, t.clone())
        missing = [p for p in graph.param_types if p not in self._names]
        if missing:
            raise IRError(f"graph {graph.name}: no weight data for parameter(s) {', '.join(missing[:5])}")

    def tensor(self, value: str) -> torch.Tensor:
        return getattr(self, self._names[value])

    def named_graph_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters by IR value name."""
        return {name: self.tensor(name) for name in self._names}

    def masters(self) -> dict[str, torch.Tensor]:
        """Copies of the fake-quant float master weights by value name: what `to_graph` rounds, kept to resume."""
        return {name: self.tensor(name).detach().clone() for name in self._masters}

    def load_masters(self, masters: Mapping[str, torch.Tensor]) -> None:
        """Set the float master weights (from `masters()`), sub-step fractions included."""
        if set(masters) != set(self._masters):
            odd = sorted(set(masters) ^ set(self._masters))[:3]
            raise IRError(f"graph {self.graph.name}: master weights for {odd} do not match its QDQ weights")
        with torch.no_grad():
            for name, t in masters.items():
                self.tensor(name).copy_(t)

    def _weight_grid(self, name: str, master: torch.Tensor) -> torch.Tensor:
        """A float master weight's integers on its grid (the stored weight's dtype), straight-through."""
        dq = self._masters[name]
        dtype = _torch_dtype(str(self.graph.weights[name].dtype))
        q = fake_quantize(master, self.tensor(dq.inputs[1]), self.tensor(dq.inputs[2]), dtype, dq.attrs["axis"])
        return torch.clamp(q, min=WEIGHT_QMIN_INT8) if dtype == torch.int8 else q

    def _run(self, node: Node, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.fake_quant and node.op == "quantize":
            return (fake_quantize(args[0], args[1], args[2], _torch_dtype(node.out_types[0].dtype),
                                  node.attrs["axis"]),)
        if self.fake_quant and node.op == "dequantize" and node.inputs[0] in self._masters:
            args = [self._weight_grid(node.inputs[0], args[0]), *args[1:]]
        return run_node(node, args)

    def forward(self, *inputs: torch.Tensor, hook: Callable[[Node, tuple[torch.Tensor, ...]], None] | None = None):
        env: dict[str, torch.Tensor] = {name: self.tensor(name) for name in self._names}
        for (name, _), x in zip(self.graph.inputs, inputs):
            env[name] = x
        remaining = _last_uses(self.graph)
        for i, node in enumerate(self.graph.nodes):
            outs = self._run(node, [env[v] for v in node.inputs])
            if hook is not None:
                hook(node, outs)
            env.update(zip(node.outputs, outs))
            for v in remaining[i]:
                env.pop(v, None)
        result = tuple(env[o] for o in self.graph.outputs)
        return result[0] if len(result) == 1 else result

    def to_graph(self) -> Graph:
        """The graph with its weights replaced by this module's current values (fake-quant masters re-quantized)."""
        weights = {}
        for name in self._names:
            t = self.tensor(name).detach()
            if name in self._masters:
                t = self._weight_grid(name, t).to(_torch_dtype(str(self.graph.weights[name].dtype)))
            weights[name] = t.cpu().numpy().copy()
        return self.graph.replace(weights=weights)


def _last_uses(graph: Graph) -> list[list[str]]:
    """For each node index, the values whose last use it is (freed to bound memory)."""
    keep = set(graph.outputs) | set(graph.param_types)
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last[v] = i
    out: list[list[str]] = [[] for _ in graph.nodes]
    for v, i in last.items():
        if v not in keep:
            out[i].append(v)
    return out


def run(graph: Graph, inputs: Sequence[Any] | np.ndarray, *, check: bool = True) -> list[np.ndarray]:
    """Run the graph on numpy (or torch) inputs without gradients; returns numpy outputs."""
    if isinstance(inputs, np.ndarray) or torch.is_tensor(inputs):
        inputs = [inputs]
    if check:
        check_inputs(graph, inputs)
    tensors = [torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(_torch_dtype(t.dtype))
               for x, (_, t) in zip(inputs, graph.inputs)]
    with torch.no_grad():
        out = GraphModule(graph)(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def example_inputs(graph: Graph, seed: int = 0, batch: int = 1) -> list[np.ndarray]:
    """Deterministic random inputs matching the graph's input types (symbolic dims set to `batch`)."""
    rng = np.random.default_rng(seed)
    out = []
    for _, t in graph.inputs:
        shape = tuple(d if isinstance(d, int) else batch for d in t.shape)
        if np.issubdtype(np.dtype(t.dtype), np.floating):
            out.append(rng.standard_normal(shape).astype(t.dtype))
        else:
            out.append(rng.integers(0, 10, size=shape).astype(t.dtype))
    return out


def input_types_of(arrays: Sequence[np.ndarray]) -> list[TensorType]:
    return [TensorType.of(np.asarray(a)) for a in arrays]
