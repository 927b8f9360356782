"""Reading a QDQ graph next to the float graph it came from: int8 layers, float operands, per-channel statistics.

Recovery passes after `quantize` (bias-correct, quant-fallback) compare the QDQ graph with the float graph
quantize was given; `PassContext.inputs_of["quantize"]` holds it. Both have the same layer names (quantize only
inserts nodes and swaps weight operands), which is how a QDQ layer finds its float twin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from slimc.errors import PipelineError
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext
from slimc.passes.quant.fold import dequantized_weight

LAYER_OPS = ("conv2d", "dense")


def float_model(ctx: PassContext, who: str) -> Graph:
    """The float graph `quantize` started from earlier in this pipeline, or a PipelineError saying how to get one."""
    given = ctx.inputs_of.get("quantize")
    if given is None:
        raise PipelineError(f"{who} compares the int8 model with the float model quantize started from, so it must "
                            "run in the same pipeline after quantize (e.g. 'calibrate,quantize,bias-correct,fold-qdq'); "
                            "from Python, pass PassContext(inputs_of={'quantize': PassInput(float_graph)})")
    return given.graph


def activation_source(g: Graph, v: str) -> str | None:
    """The float value an activation QDQ pair (quantize -> dequantize) reads, if `v` is such a pair's output."""
    dq = g.producer(v)
    if dq is None or dq.op != "dequantize" or g.is_param(dq.inputs[0]):
        return None
    q = g.producer(dq.inputs[0])
    return q.inputs[0] if q is not None and q.op == "quantize" else None


def float_source(g: Graph, v: str) -> str:
    """`v` without its activation quantization (the value its QDQ pair reads), or `v` itself."""
    return activation_source(g, v) or v


def is_int8(g: Graph, n: Node) -> bool:
    """Whether `n` is a layer or add that quantize put in int8 (all its activation operands and weight are QDQ'd)."""
    if n.op in LAYER_OPS:
        return activation_source(g, n.inputs[0]) is not None and dequantized_weight(g, n.inputs[1]) is not None
    if n.op == "add":
        return all(activation_source(g, i) is not None for i in n.inputs)
    return False


def int8_nodes(g: Graph, op_names: Sequence[str] = (*LAYER_OPS, "add")) -> list[Node]:
    """The int8 nodes of a QDQ graph with one of `op_names`, in graph order."""
    return [n for n in g.nodes if n.op in op_names and is_int8(g, n)]


def check_twins(q: Graph, f: Graph, nodes: Sequence[Node], who: str) -> None:
    """Every int8 node of `q` must have a float node of the same name and op in `f` (with the same weight shape)."""
    bad = []
    for n in nodes:
        try:
            m = f.node(n.name)
        except Exception:
            bad.append(n.name)
            continue
        if m.op != n.op or (n.op in LAYER_OPS and f.type_of(m.inputs[1]).shape != q.type_of(n.inputs[1]).shape):
            bad.append(n.name)
    if bad:
        raise PipelineError(f"{who}: layer(s) {', '.join(bad[:5])} of the int8 graph have no matching layer in the "
                            "float graph quantize started from; run it right after quantize (and bias-correct), "
                            "before passes that change the graph's structure such as fold-qdq")


@dataclass(frozen=True)
class Samples:
    """Model inputs held in memory (one array per graph input, batch first) and their labels if known."""

    arrays: tuple[np.ndarray, ...]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def head(self, n: int) -> Samples:
        return Samples(tuple(a[:n] for a in self.arrays), None if self.labels is None else self.labels[:n])


def load_samples(data, limit: int, who: str) -> Samples:
    """The first `limit` samples of a dataset (0: all), with labels only if every batch has them."""
    if data is None:
        raise PipelineError(f"{who} runs the model on data: pass --calib or --data (or PassContext(calib=...))")
    parts: list[tuple[np.ndarray, ...]] = []
    labels: list[np.ndarray] | None = []
    seen = 0
    for b in data.batches(64):
        n = len(b) if not limit else min(len(b), limit - seen)
        parts.append(tuple(np.asarray(a)[:n] for a in b.inputs))
        if labels is not None and b.labels is not None:
            labels.append(np.asarray(b.labels)[:n])
        else:
            labels = None
        seen += n
        if limit and seen >= limit:
            break
    if not seen:
        raise PipelineError(f"{who}: the data has no samples")
    arrays = tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))
    return Samples(arrays, np.concatenate(labels) if labels else None)


def fixed_batch(g: Graph) -> int | None:
    """The batch size the graph's inputs fix (a static leading dim), or None if it is symbolic."""
    dims = {t.shape[0] for _, t in g.inputs if t.rank}
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if len(fixed) == 1 and len(dims) == 1 else None


def batches(g: Graph, samples: Samples, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """The samples in the batch size the graph needs (its fixed batch if it has one; a partial tail is dropped)."""
    size = fixed_batch(g) or batch_size
    n = len(samples)
    stop = n - n % size if fixed_batch(g) else n
    if stop <= 0:
        raise PipelineError(f"graph {g.name} fixes its batch size to {size} but only {n} samples were given")
    for s in range(0, stop, size):
        yield tuple(a[s:s + size] for a in samples.arrays)


def run_outputs(g: Graph, samples: Samples, batch_size: int) -> list[np.ndarray]:
    """The graph's outputs on all samples, concatenated over batches."""
    from slimc import interpreter

    outs = [interpreter.run(g, list(b)) for b in batches(g, samples, batch_size)]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def input_chunks(g: Graph, samples: Samples, batch_size: int) -> list[dict]:
    """The samples as torch tensors per graph input, in the batches `batches` gives (what a Sweep starts from)."""
    import torch

    dtypes = [getattr(torch, t.dtype) for _, t in g.inputs]
    return [{name: torch.as_tensor(np.ascontiguousarray(a)).to(dt) for (name, _), a, dt in zip(g.inputs, b, dtypes)}
            for b in batches(g, samples, batch_size)]


def last_uses(g: Graph) -> list[list[str]]:
    """For each node index, the activation values read for the last time there (freed as the sweep goes)."""
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if not g.is_param(v):
                last[v] = i
    out: list[list[str]] = [[] for _ in g.nodes]
    for v, i in last.items():
        if v not in g.outputs:
            out[i].append(v)
    return out


class Sweep:
    """Runs a graph node by node over several chunks of samples at once, freeing values after their last use."""

    def __init__(self, g: Graph, chunks: list[dict]) -> None:
        from slimc import interpreter

        self.g, self.module = g, interpreter.GraphModule(g)
        self.envs = [dict(c) for c in chunks]
        self.frees = last_uses(g)
        self.done = 0

    def _args(self, env: dict, n) -> list:
        return [env[v] if v in env else self.module.tensor(v) for v in n.inputs]

    def values(self, v: str) -> list:
        """Value `v` per chunk as the sweep has it now (a parameter: the same tensor for every chunk)."""
        return [env[v] if v in env else self.module.tensor(v) for env in self.envs]

    def linear(self, i: int) -> list:
        """Node i's output per chunk without its fused activation (the environment is left as it is)."""
        from slimc import interpreter

        n = self.g.nodes[i]
        lin = n.replace(attrs={**n.attrs, "act": "none", "clip_min": None, "clip_max": None})
        return [interpreter.run_node(lin, self._args(env, n))[0] for env in self.envs]

    def finish(self, i: int, outs: list) -> None:
        """Store node i's (single) output per chunk and free what it read for the last time."""
        for env, out in zip(self.envs, outs):
            env[self.g.nodes[i].name] = out
            for v in self.frees[i]:
                env.pop(v, None)
        self.done = i + 1

    def run(self, i: int, keep_linear: bool = False) -> list | None:
        """Run node i on every chunk; with keep_linear, return its pre-activation outputs too."""
        from slimc import interpreter

        n = self.g.nodes[i]
        if keep_linear:
            pre = self.linear(i)
            self.finish(i, [interpreter.apply_activation(p, n.attrs) for p in pre])
            return pre
        for env in self.envs:
            env.update(zip(n.outputs, interpreter.run_node(n, self._args(env, n))))
            for v in self.frees[i]:
                env.pop(v, None)
        self.done = i + 1
        return None
