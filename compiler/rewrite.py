"""Shared graph-rewriting helpers: batched edits (rewire uses, replace/remove nodes, add params), DCE, provenance."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from slimc import ops
from slimc.errors import IRError
from slimc.ir import AttrValue, Graph, Node, TensorType, sanitize_name, unique_name


def merge_source(*nodes: Node) -> tuple[str, ...]:
    """Provenance of a fused node: every frontend node its parts came from (a node's name if it has none)."""
    merged: dict[str, None] = {}
    for n in nodes:
        for s in n.source or (n.name,):
            merged.setdefault(s, None)
    return tuple(merged)


def sole_user(g: Graph, value: str) -> Node | None:
    """The one node reading `value`, or None if it has several readers, none, or is a graph output."""
    users = g.users(value)
    if len(users) != 1 or value in g.outputs:
        return None
    return users[0]


def exclusive_to(g: Graph, value: str, node: Node) -> bool:
    """Whether `node` is the only reader of `value` (so a rewrite of `node` may drop or reuse it)."""
    user = sole_user(g, value)
    return user is not None and user.name == node.name


class Edit:
    """A batch of local rewrites of one graph, applied in a single rebuild so that a sweep stays O(nodes).

    Rewrites are recorded against the graph as it was (`self.graph`); `apply()` builds the new graph:
    replaced nodes are put in place, every use of a redirected value (node inputs and graph outputs) reads
    its replacement, and parameters nobody uses any more are dropped. The input graph is never modified.
    Calibrated ranges survive only for values whose computation the batch cannot have changed (see `apply`).
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._redirect: dict[str, str] = {}
        self._replace: dict[str, tuple[Node, ...]] = {}
        self._new_weights: dict[str, np.ndarray] = {}
        self._taken: set[str] = set()
        self._freed: set[str] = set()
        self._existing: set[str] | None = None
        self._placed: set[str] = set()

    @property
    def empty(self) -> bool:
        """Whether nothing was recorded (then `apply()` returns the input graph itself)."""
        return not (self._redirect or self._replace or self._new_weights)

    def resolve(self, value: str) -> str:
        """The value that `value` stands for once this batch's redirections are applied."""
        seen = {value}
        while value in self._redirect:
            value = self._redirect[value]
            if value in seen:
                raise IRError(f"rewrite redirects %{value} in a cycle")
            seen.add(value)
        return value

    def type_of(self, value: str) -> TensorType:
        """Type of an existing value or of a parameter added by this batch."""
        if value in self._new_weights:
            return TensorType.of(self._new_weights[value])
        return self.graph.type_of(value)

    def make_node(self, name: str, op: str, inputs: Sequence[str], attrs: Mapping[str, AttrValue] | None = None,
                  source: Sequence[str] = ()) -> Node:
        """A validated node with inferred output types; inputs may be parameters added by this batch."""
        return ops.make_node(name, op, inputs, [self.type_of(i) for i in inputs], attrs, source)

    def replace_uses(self, old: str, new: str) -> None:
        """Make every use of `old` (node inputs and graph outputs) read `new`, which must have the same type."""
        if self.type_of(old) != self.type_of(new):
            raise IRError(f"cannot replace %{old}: {self.type_of(old)} by %{new}: {self.type_of(new)}")
        if old != new:
            self._redirect[old] = new

    def replace_node(self, name: str, *nodes: Node) -> None:
        """Put `nodes` where node `name` was (none: remove it); a replacement may reuse its name and outputs."""
        old = self.graph.node(name)
        if name in self._replace:
            raise IRError(f"node {name} is rewritten twice in one batch")
        self._replace[name] = tuple(nodes)
        self._placed |= {n.name for n in nodes}
        kept = {n.name for n in nodes} | {o for n in nodes for o in n.outputs}
        self._freed |= ({old.name, *old.outputs} - kept)

    def remove_node(self, name: str) -> None:
        """Drop node `name`; its outputs must be redirected (replace_uses) or unused."""
        self.replace_node(name)

    def fresh_name(self, base: str) -> str:
        """A name no value or node has in the result; a removed node's output name may be reused, taking its uses."""
        if self._existing is None:
            self._existing = set(self.graph.value_types) | {n.name for n in self.graph.nodes}

        def taken(name: str) -> bool:
            return ((name in self._existing and name not in self._freed) or name in self._taken
                    or name in self._redirect or name in self._placed)

        name = unique_name(sanitize_name(base), taken)
        self._taken.add(name)
        return name

    def add_param(self, base: str, array: np.ndarray) -> str:
        """Add a parameter holding `array` under a fresh name derived from `base`; returns the name."""
        name = self.fresh_name(base)
        self._new_weights[name] = array
        return name

    def set_param(self, name: str, array: np.ndarray) -> None:
        """Give an existing parameter a new value of the same type (the old array is left untouched)."""
        if not self.graph.is_param(name):
            raise IRError(f"%{name} is not a parameter of graph {self.graph.name}")
        if TensorType.of(array) != self.graph.param_types[name]:
            raise IRError(f"new value {TensorType.of(array)} of %{name} does not match {self.graph.param_types[name]}")
        self._new_weights[name] = array

    def apply(self) -> Graph:
        """The rewritten graph (the input graph itself if nothing was recorded).

        A calibrated range is kept only if its value still exists and is not downstream of a change: outputs of
        replaced nodes (even under a reused name) and of every node reading, directly or not, one of them or a
        parameter given a new value lose their range, so a stale range can never reach quantization.
        """
        g = self.graph
        if self.empty:
            return g
        nodes: list[Node] = []
        for n in g.nodes:
            for m in self._replace.get(n.name, (n,)):
                ins = tuple(self.resolve(i) for i in m.inputs)
                nodes.append(m if ins == m.inputs else m.replace(inputs=ins))
        ptypes = dict(g.param_types)
        ptypes.update((k, TensorType.of(v)) for k, v in self._new_weights.items())
        weights = {**g.weights, **self._new_weights}
        outputs = tuple(self.resolve(o) for o in g.outputs)
        out = Graph(g.name, g.inputs, outputs, tuple(nodes), ptypes, weights, g.calibration, g.channel_calibration)
        if out.calibration:
            changed = set(self._new_weights) | {o for ms in self._replace.values() for m in ms for o in m.outputs}
            out = out.replace(calibration=out.calibration_without(changed)).drop_stale_calibration()
        return out.drop_unused_params()


def replace_uses(g: Graph, old: str, new: str) -> Graph:
    """`g` with every use of value `old`, including graph outputs, reading `new` instead."""
    e = Edit(g)
    e.replace_uses(old, new)
    return e.apply()


def remove_nodes(g: Graph, names: Iterable[str]) -> Graph:
    """`g` without the named nodes (their outputs must be unused or already rewired)."""
    e = Edit(g)
    for n in names:
        e.remove_node(n)
    return e.apply()


def add_param(g: Graph, base: str, array: np.ndarray) -> tuple[Graph, str]:
    """`g` with a new parameter named after `base` (unused until a node reads it; DCE drops it otherwise)."""
    name = g.fresh_name(base)
    return g.replace(param_types={**g.param_types, name: TensorType.of(array)},
                     weights={**g.weights, name: array}), name


def eliminate_dead_code(g: Graph) -> tuple[Graph, int]:
    """Drop nodes that do not reach an output and parameters nobody reads; returns (graph, nodes removed)."""
    live: set[str] = set(g.outputs)
    kept: list[Node] = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            kept.append(n)
            live.update(n.inputs)
    removed = len(g.nodes) - len(kept)
    out = g if removed == 0 else g.replace(nodes=tuple(reversed(kept)))
    return out.drop_unused_params(), removed


def rename_values(g: Graph, renames: dict[str, str]) -> Graph:
    """`g` with single-output nodes renamed (their output value -> new name); uses and calibrated ranges follow."""
    if not renames:
        return g
    nodes = []
    for n in g.nodes:
        ins = tuple(renames.get(i, i) for i in n.inputs)
        nodes.append(n.replace(name=renames.get(n.name, n.name), inputs=ins))
    calibration = {renames.get(v, v): r for v, r in g.calibration.items()}
    channels = {renames.get(v, v): r for v, r in g.channel_calibration.items()}
    return g.replace(nodes=tuple(nodes), outputs=tuple(renames.get(o, o) for o in g.outputs),
                     calibration=calibration, channel_calibration=channels)


def keep_output_names(before: Graph, after: Graph) -> Graph:
    """Give `after`'s outputs the value names `before` had where a rewrite changed them (stable interface)."""
    renames: dict[str, str] = {}
    for old, new in zip(before.outputs, after.outputs):
        prod = after.producer(new)
        if (old == new or old in after.value_types or prod is None or len(prod.outputs) != 1
                or after.outputs.count(new) != 1 or before.outputs.count(old) != 1
                or any(n.name == old for n in after.nodes)):
            continue
        renames[new] = old
    return rename_values(after, renames)


def with_input_shapes(g: Graph, shapes: Sequence[Sequence[int]]) -> Graph:
    """`g` with its inputs given these static shapes (e.g. batch 1 for a graph saved with a symbolic batch) and every
    node's output type inferred again; a shape contradicting a fixed dimension is an error naming the input."""
    from slimc.errors import ShapeError

    if len(shapes) != len(g.inputs):
        raise ShapeError(f"{g.name} has {len(g.inputs)} input(s), got {len(shapes)} --input-shape value(s)")
    types = dict(g.param_types)
    inputs = []
    for (name, t), shape in zip(g.inputs, shapes):
        shape = tuple(int(d) for d in shape)
        if len(shape) != t.rank or any(isinstance(d, int) and d != s for d, s in zip(t.shape, shape)):
            raise ShapeError(f"input %{name} is {t}; --input-shape {','.join(map(str, shape))} does not fit it")
        types[name] = TensorType(shape, t.dtype)
        inputs.append((name, types[name]))
    nodes = []
    for n in g.nodes:
        m = ops.make_node(n.name, n.op, n.inputs, [types[i] for i in n.inputs], n.attrs, n.source)
        types.update(zip(m.outputs, m.out_types))
        nodes.append(m)
    return g.replace(inputs=tuple(inputs), nodes=tuple(nodes))
