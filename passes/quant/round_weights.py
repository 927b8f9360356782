"""round-weights: data-aware rounding of the int8 conv/dense weights of a QDQ graph (GPTQ, Frantar et al. 2022).

Rounding each weight to its nearest grid point ignores that the rounding errors of the weights feeding one output
add up: what matters is the layer's output error ||(W - Q) X|| on real inputs X, not ||W - Q||. GPTQ (after OBQ)
rounds the input columns of W one at a time and moves each column's rounding error onto the columns not rounded
yet, weighted by the inverse of H = X X^T (the inputs' second moments; for conv2d over im2col patches), so that
later columns compensate it. Per output channel the problem is separable and the per-channel scales stay as
quantize chose them (the bias-safe floor still holds); only the int8 values behind each weight's dequantize move.

Layers are rounded in graph order while the QDQ graph runs over the calibration samples, so each layer's X is what
the int8 model computes with every earlier layer already re-rounded (the errors of earlier layers are part of the
inputs this layer is fitted to). `target=float` fits the float layer's output on the float model's inputs instead
(W X_float ~ Q X_int8: a least-squares weight W* = W C H^-1 with C = X_float X_int8^T, then GPTQ on W*), which also
absorbs upstream errors that are linear in the inputs. Depthwise and grouped convs have one H per group
(kh*kw x kh*kw for depthwise), dense layers one over their input features. H is summed in float64 over one sample's
patches at a time, so memory does not grow with the batch size and results do not depend on it.

Run it right after quantize and before bias-correct (which then removes the mean error the new rounding leaves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from slimc.errors import PipelineError
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.quant.fold import dequantized_weight
from slimc.passes.quant.qdq import Sweep, check_twins, float_model, input_chunks, int8_nodes, load_samples
from slimc.passes.quant.scheme import scheme_for
from slimc.rewrite import Edit

WHO = "round-weights"
METHODS = ("gptq", "nearest")
TARGETS = ("int8", "float")


@dataclass(frozen=True)
class Layer:
    """An int8 conv/dense layer whose weight can be re-rounded: its int8 parameter, scales and input grouping."""

    name: str
    dequantize: str  # the weight's dequantize node (its only reader is this layer)
    int8: str  # the int8 weight parameter behind it
    scale: np.ndarray  # float32 per output channel
    groups: int
    kernel: tuple[int, ...]  # (kh, kw) of conv2d, () for dense


def roundable_layers(q: Graph) -> tuple[list[Layer], list[str]]:
    """The int8 conv/dense layers whose weight dequantize and int8 parameter belong to them alone, and the others
    (a weight shared by several layers keeps its nearest rounding: one rounding cannot fit two inputs)."""
    layers, shared = [], []
    for n in int8_nodes(q, ("conv2d", "dense")):
        w = dequantized_weight(q, n.inputs[1])
        dq = q.producer(n.inputs[1])
        if w is None or len(q.users(n.inputs[1])) != 1 or len(q.users(w[0])) != 1:
            shared.append(n.name)
            continue
        conv = n.op == "conv2d"
        layers.append(Layer(n.name, dq.name, w[0], w[2], int(n.attrs["groups"]) if conv else 1,
                            tuple(w[1].shape[2:]) if conv else ()))
    return layers, shared


def patches(x, n: Node, lay: Layer):
    """The layer's input as (samples, groups, features per group, positions): im2col for conv2d, rows for dense."""
    import torch.nn.functional as F

    if n.op == "dense":
        return x.reshape(1, 1, -1, x.shape[-1]).transpose(2, 3)
    top, left, bottom, right = n.attrs["padding"]
    if (top, left) != (bottom, right):
        x, pad = F.pad(x, (left, right, top, bottom)), (0, 0)
    else:
        pad = (top, left)
    cols = F.unfold(x, lay.kernel, tuple(n.attrs["dilation"]), pad, tuple(n.attrs["stride"]))
    return cols.reshape(x.shape[0], lay.groups, -1, cols.shape[-1])


def accumulate(h, c, xq, xf, n: Node, lay: Layer) -> None:
    """Add one chunk's H = sum x x^T (per group) to `h` and, given float inputs, C = sum x_float x^T to `c`: one
    sample at a time (float32 products summed in float64 in sample order: bounded memory, no batch-size effect)."""
    for s in range(xq.shape[0]):
        pq = patches(xq[s:s + 1], n, lay)[0]
        h += (pq @ pq.transpose(1, 2)).double()
        if c is not None:
            c += (patches(xf[s:s + 1], n, lay)[0] @ pq.transpose(1, 2)).double()


def damped_cholesky(h, damp: float):
    """(H + damp * mean(diag H) * I, upper Cholesky factor of its inverse), per group; dead inputs get diag 1."""
    import torch

    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0  # an input that is always 0: its column is rounded to nearest, nothing flows through it
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    lam = damp * diag.mean(-1)[:, None, None]
    for _ in range(8):  # more damping until positive definite (calibration data spanning too few directions)
        hd = h + lam * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if not info.any():
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if not info.any():
                return hd, upper
        lam = torch.clamp(lam * 10, min=1e-8)
    raise PipelineError(f"{WHO}: the inputs' Hessian stays singular after damping; raise damp=")


def gptq(w, u, qmax: int, block: int):
    """GPTQ-round `w` (groups, rows, columns; in grid steps) given the upper Cholesky factor `u` of H^-1 per group:
    each column is rounded and its error, scaled by u, is spread over the columns after it (lazily, per block)."""
    import torch

    w = w.clone()
    q = torch.empty_like(w)
    cols = w.shape[-1]
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb, ub = w[..., b0:b1].clone(), u[:, b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            col = wb[..., i]
            qc = torch.clamp(torch.round(col), -qmax, qmax)
            q[..., b0 + i] = qc
            e = (col - qc) / ub[:, i, i][:, None]
            wb[..., i:] -= e[..., None] * ub[:, None, i, i:]
            err[..., i] = e
        w[..., b1:] -= err @ u[:, b0:b1, b1:]
    return q


def output_error(w, q, h) -> float:
    """sum over rows of (w - q) H (w - q)^T: the squared output error on the inputs H was accumulated from."""
    import torch

    d = w - q
    return float(torch.einsum("gri,gij,grj->", d, h, d))


@dataclass(frozen=True)
class Rounding:
    """How to round: method (gptq or nearest), what to fit (int8 or float inputs), dampening, block, act order."""

    method: str = "gptq"
    target: str = "int8"
    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    qmax: int = 127


def _columns(m, perm):
    """`m` (groups, rows, columns) with its columns in `perm`'s order, per group."""
    import torch

    return torch.gather(m, 2, perm[:, None, :].expand_as(m))


def round_layer(wf: np.ndarray, layer: Layer, h, c, r: Rounding) -> tuple[np.ndarray, float, float]:
    """The layer's new int8 weight and the output errors (on the calibration inputs) of nearest and of this
    rounding, both against the weight fitted (W, or W* for target=float)."""
    import torch

    g = layer.groups
    rows = wf.shape[0] // g
    s = torch.as_tensor(layer.scale.astype(np.float64)).reshape(g, rows, 1)
    w = torch.as_tensor(wf.astype(np.float64)).reshape(g, rows, -1)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    if r.method == "gptq" and r.act_order:  # columns with the largest inputs first: their errors have the most
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # columns left to be compensated by
    else:
        perm = torch.arange(diag.shape[-1]).expand_as(diag)
    w, h = _columns(w, perm), _columns(_columns(h, perm).transpose(1, 2), perm)  # (H is symmetric)
    hd, u = damped_cholesky(h, r.damp)
    if c is not None:  # least-squares weight for the float output on the int8 inputs: W* = W C H^-1, written as
        # W + W (C - H) H^-1 so that the dampening only damps the correction instead of shrinking all of W
        c = _columns(_columns(c, perm).transpose(1, 2), perm).transpose(1, 2)
        w = w + torch.linalg.solve(hd, (w @ (c - h)).transpose(1, 2)).transpose(1, 2)
    ws = w / s
    nearest = torch.clamp(torch.round(ws), -r.qmax, r.qmax)
    q = nearest if r.method == "nearest" else gptq(ws, u, r.qmax, r.block)
    before, after = output_error(w, nearest * s, h), output_error(w, q * s, h)
    q = _columns(q, torch.argsort(perm, dim=-1))
    return q.reshape(wf.shape).numpy().astype(np.int8), before, after


def reround(q: Graph, f: Graph, layers: list[Layer], samples, batch_size: int, r: Rounding,
            log=lambda msg: None) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """New int8 weights per layer, found in one sweep of the QDQ graph (and of the float graph for target=float)
    over all samples: each layer is fitted to its inputs with every earlier layer already re-rounded."""
    import torch

    from slimc import interpreter

    by_name = {lay.name: lay for lay in layers}
    chunks = input_chunks(q, samples, batch_size)
    sweep_q = Sweep(q, chunks)
    sweep_f = Sweep(f, chunks) if r.target == "float" else None
    f_index = {n.name: i for i, n in enumerate(f.nodes)}
    new: dict[str, np.ndarray] = {}
    errors: dict[str, tuple[float, float]] = {}
    t0 = last = time.perf_counter()
    with torch.no_grad():
        for i, n in enumerate(q.nodes):
            lay = by_name.get(n.name)
            if lay is not None:
                fn = f.node(n.name)
                xf = None
                if sweep_f is not None:
                    while sweep_f.done < f_index[n.name]:
                        sweep_f.run(sweep_f.done)
                    xf = sweep_f.values(fn.inputs[0])
                k = int(np.prod(q.type_of(n.inputs[1]).shape[1:]))
                h = torch.zeros(lay.groups, k, k, dtype=torch.float64)
                c = torch.zeros_like(h) if xf is not None else None
                for j, xq in enumerate(sweep_q.values(n.inputs[0])):
                    accumulate(h, c, xq, None if xf is None else xf[j], n, lay)
                new[n.name], before, after = round_layer(f.weight(fn.inputs[1]), lay, h, c, r)
                errors[n.name] = (before, after)
                dq = q.node(lay.dequantize)
                w = interpreter.run_node(dq, [torch.as_tensor(new[n.name])] + sweep_q.values(dq.inputs[1])[:1]
                                         + sweep_q.values(dq.inputs[2])[:1])[0]
                for env in sweep_q.envs:
                    env[dq.name] = w
                if time.perf_counter() - last > 20 or len(errors) == len(layers):
                    last = time.perf_counter()
                    log(f"{WHO}: {len(errors)}/{len(layers)} layers rounded ({last - t0:.0f} s)")
                if len(errors) == len(layers):
                    break
            sweep_q.run(i)
    return new, errors


def with_weights(q: Graph, layers: list[Layer], new: dict[str, np.ndarray]) -> Graph:
    """`q` with each layer's int8 weight parameter replaced by its new values (scales unchanged)."""
    e = Edit(q)
    for lay in layers:
        e.set_param(lay.int8, new[lay.name])
    return e.apply()


def _db(before: float, after: float) -> float | None:
    return round(10 * np.log10(before / after), 2) if after > 0 and before > 0 else None


@register_pass(
    WHO,
    method=opt(str, "gptq", "gptq (error feedback through the inputs' inverse Hessian) or nearest"),
    target=opt(str, "int8", "fit the layer's output on the int8 model's inputs (int8) or the float model's (float)"),
    samples=opt(int, 128, "calibration samples (0: all); all of them are held in memory at once"),
    batch_size=opt(int, 16, "samples per interpreter call"),
    damp=opt(float, 0.01, "dampening of H: this share of its mean diagonal is added to the diagonal"),
    block=opt(int, 128, "columns per lazy GPTQ update block"),
    act_order=opt(bool, True, "round the columns with the largest inputs first"),
)
def round_weights(graph: Graph, ctx: PassContext) -> PassResult:
    """Re-round each int8 conv/dense weight on its scales to minimise the layer's output error on calibration data."""
    o = ctx.options
    r = Rounding(o.get("method", "gptq"), o.get("target", "int8"), o.get("damp", 0.01), o.get("block", 128),
                 o.get("act_order", True), scheme_for(ctx.target).weight_max)
    limit, batch_size = o.get("samples", 128), o.get("batch_size", 16)
    if r.method not in METHODS or r.target not in TARGETS:
        raise PipelineError(f"{WHO}: method={r.method} must be one of {', '.join(METHODS)} and target={r.target} "
                            f"one of {', '.join(TARGETS)}")
    if limit < 0 or batch_size < 1 or r.block < 1 or not r.damp > 0:
        raise PipelineError(f"{WHO}: samples={limit} must be >= 0 (0: all), batch_size={batch_size} and "
                            f"block={r.block} >= 1, damp={r.damp} > 0")
    f = float_model(ctx, WHO)
    samples = load_samples(ctx.calibration_data, limit, WHO)
    layers, shared = roundable_layers(graph)
    check_twins(graph, f, [graph.node(lay.name) for lay in layers], WHO)
    if not layers:
        return PassResult(graph, False, {"layers": 0, "samples": len(samples), "shared_weights": shared})
    t0 = time.perf_counter()
    new, errors = reround(graph, f, layers, samples, batch_size, r, ctx.log)
    before, after = sum(b for b, _ in errors.values()), sum(a for _, a in errors.values())
    changed = sum(int((new[lay.name] != graph.weight(lay.int8)).sum()) for lay in layers)
    total = sum(graph.weight(lay.int8).size for lay in layers)
    gains = {name: _db(b, a) for name, (b, a) in errors.items()}
    ctx.log(f"{WHO}: {len(layers)} layers, {changed / total:.1%} of the weights moved, calibration output error "
            f"{_db(before, after)} dB below nearest rounding (median layer "
            f"{np.median([v for v in gains.values() if v is not None] or [0.0]):.2f} dB), "
            f"{time.perf_counter() - t0:.0f} s")
    stats = {"layers": len(layers), "samples": len(samples), "shared_weights": shared,
             "moved_share": round(changed / total, 4), "output_error_gain_db": gains}
    return PassResult(with_weights(graph, layers, new), changed > 0, stats)
