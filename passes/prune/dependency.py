"""Dependency analysis: which channels of the whole graph must be removed together, and which may not be removed.

Every channel of every value is an atom; each node's channel rule (rules.py) links atoms that are the same
channel and blocks atoms that must stay. Connected atoms form a *unit*: the smallest thing pruning removes
(one output channel of a conv plus everything it becomes downstream: BN entries, residual partners, concat slots,
flattened features, SE scales, shuffled positions, whole conv groups). Units that touch exactly the same values
form a *group* (Torch-Pruning's notion): e.g. channel c of every conv feeding one ResNet stage's residual adds.
The analysis is structural: it depends on shapes, not weight values, so it can be reused for masked copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from slimc.errors import IRError
from slimc.ir import Graph, Node
from slimc.passes.prune.rules import (CHANNEL_RULES, ChannelMap, ChannelRule, NodeView, Port, blocked_everywhere,
                                      default_axis)


@dataclass(frozen=True)
class Blocker:
    """Why some channels must stay: the node (or graph boundary) that says so."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


@dataclass(frozen=True)
class MemberRef:
    """Parameter `param` (operand `slot` of `node`) whose `axis` follows the channels of `value`."""

    node: str
    slot: int
    param: str
    axis: int
    value: str
    role: str


@dataclass(frozen=True, eq=False)
class Group:
    """Units that touch the same values; its channels are counted on `reference` (a producer's output)."""

    id: int
    values: tuple[str, ...]
    units: np.ndarray  # unit labels, ascending
    widths: np.ndarray  # channels of `reference` per unit
    blocked: np.ndarray  # per unit: must stay
    reference: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    through: tuple[str, ...]
    members: tuple[MemberRef, ...]
    blockers: tuple[Blocker, ...]

    @property
    def channels(self) -> int:
        return int(self.widths.sum())

    @property
    def prunable_units(self) -> np.ndarray:
        return self.units[~self.blocked]

    @property
    def is_blocked(self) -> bool:
        return bool(self.blocked.all())


@dataclass(frozen=True, eq=False)
class Analysis:
    """The channel structure of one graph: tracked axis and unit of every channel of every value, and the groups."""

    axes: Mapping[str, int | None]
    unit_of: Mapping[str, np.ndarray]  # value -> unit label of each channel
    groups: tuple[Group, ...]
    group_of: np.ndarray  # unit label -> group id
    maps: Mapping[str, ChannelMap]  # node name -> what its rule said

    @property
    def num_units(self) -> int:
        return len(self.group_of)

    @property
    def blocked_units(self) -> np.ndarray:
        """Bool mask over units: those that must stay."""
        mask = np.zeros(self.num_units, bool)
        for gr in self.groups:
            mask[gr.units[gr.blocked]] = True
        return mask

    def groups_of_value(self, value: str) -> list[Group]:
        units = self.unit_of.get(value)
        if units is None or not len(units):
            return []
        return [self.groups[g] for g in np.unique(self.group_of[units])]

    def kept(self, value: str, pruned: np.ndarray) -> np.ndarray | None:
        """Channel indices of `value` that remain when the units in `pruned` (a bool mask over units) go."""
        units = self.unit_of.get(value)
        return None if units is None else np.flatnonzero(~pruned[units])


def node_label(n: Node) -> str:
    """A node's name with the module it came from (`conv2d_3[layer1.0.conv1]`)."""
    return f"{n.name}[{n.source[1]}]" if len(n.source) >= 2 and n.source[1] != n.name else n.name


def view_of(g: Graph, n: Node, axes: Mapping[str, int | None]) -> NodeView:
    return NodeView(n, tuple(g.type_of(i) for i in n.inputs), tuple(axes.get(i) for i in n.inputs),
                    tuple(g.is_param(i) for i in n.inputs))


def _port_value(n: Node, port: Port) -> str:
    kind, i = port
    return n.inputs[i] if kind == "in" else n.outputs[i]


def _channel_maps(g: Graph, rules: Mapping[str, ChannelRule]) -> tuple[dict[str, int | None], dict[str, ChannelMap]]:
    """Run every node's rule in order, propagating the tracked channel axis of each value."""
    axes: dict[str, int | None] = {name: default_axis(t) for name, t in g.inputs}
    maps: dict[str, ChannelMap] = {}
    for n in g.nodes:
        view = view_of(g, n, axes)
        rule = rules.get(n.op)
        cm = rule.map(view) if rule else blocked_everywhere(view, f"op {n.op} has no channel rule")
        if len(cm.out_axes) != len(n.outputs):
            raise IRError(f"channel rule of {n.op} gave {len(cm.out_axes)} output axes for node {n.name} with "
                          f"{len(n.outputs)} outputs")
        for o, t, ax in zip(n.outputs, n.out_types, cm.out_axes):
            axes[o] = ax if ax is not None and isinstance(t.shape[ax], int) else None
        maps[n.name] = cm
    return axes, maps


def analyze(g: Graph, rules: Mapping[str, ChannelRule] = CHANNEL_RULES) -> Analysis:
    """Channel units and groups of `g`, with what blocks each group (see the module docstring)."""
    axes, maps = _channel_maps(g, rules)
    types = g.value_types
    base: dict[str, int] = {}
    total = 0
    for v, ax in axes.items():
        if ax is not None:
            base[v] = total
            total += int(types[v].shape[ax])  # type: ignore[arg-type]

    def ids(v: str, idx: np.ndarray | None) -> np.ndarray:
        n = int(types[v].shape[axes[v]])  # type: ignore[index, arg-type]
        idx = np.arange(n) if idx is None else np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IRError(f"channel rule refers to channel {int(idx.max())} of %{v}, which has {n}")
        return base[v] + idx

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    blocks: list[tuple[np.ndarray, Blocker]] = []
    for n in g.nodes:
        cm = maps[n.name]
        for link in cm.links:
            va, vb = _port_value(n, link.a), _port_value(n, link.b)
            if va in base and vb in base:
                rows.append(ids(va, link.ia))
                cols.append(ids(vb, link.ib))
            elif va in base or vb in base:
                v, idx = (va, link.ia) if va in base else (vb, link.ib)
                blocks.append((ids(v, idx), Blocker(n.name, n.op, "coupled with channels that are not tracked")))
        for b in cm.blocks:
            v = _port_value(n, b.port)
            if v in base:
                blocks.append((ids(v, b.idx), Blocker(n.name, n.op, b.reason)))
    for name, _ in g.inputs:
        if name in base:
            blocks.append((ids(name, None), Blocker(name, "input", "graph input")))
    for o in g.outputs:
        if o in base:
            prod = g.producer(o)
            who = Blocker(prod.name, prod.op, "graph output") if prod else Blocker(o, "input", "graph output")
            blocks.append((ids(o, None), who))

    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    n_units, labels = components(total, r, c)
    unit_of = {v: labels[b:b + int(types[v].shape[axes[v]])] for v, b in base.items()}  # type: ignore[index, arg-type]
    blocked_unit = np.zeros(n_units, bool)
    unit_blockers: list[tuple[np.ndarray, Blocker]] = []
    for atom_ids, who in blocks:
        u = np.unique(labels[atom_ids])
        blocked_unit[u] = True
        unit_blockers.append((u, who))
    # only channels some conv/dense creates can be removed; anything else (constants, ...) stays
    sourced = np.zeros(n_units, bool)
    for n in g.nodes:
        for j in maps[n.name].produces:
            if n.outputs[j] in unit_of:
                sourced[unit_of[n.outputs[j]]] = True
    for n in g.nodes:
        for o in n.outputs:
            if o in unit_of:
                orphan = np.unique(unit_of[o][~sourced[unit_of[o]] & ~blocked_unit[unit_of[o]]])
                if len(orphan):
                    blocked_unit[orphan] = True
                    unit_blockers.append((orphan, Blocker(n.name, n.op, "its channels are not made by any conv/dense")))
    groups, group_of = _groups(g, maps, axes, unit_of, n_units, blocked_unit, unit_blockers)
    return Analysis(axes, unit_of, groups, group_of, maps)


def components(n: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of n atoms under the links a[k] ~ b[k]: (count, label per atom, numbered by first atom).

    Vectorized union-find (hook every link's roots onto the smaller one, then pointer-jump to stars); a
    networkx graph over the 10^5 atoms of a zoo model costs ~10x the whole analysis.
    """
    parent = np.arange(n)
    while True:
        ra, rb = parent[a], parent[b]
        low = np.minimum(ra, rb)
        new = parent.copy()
        np.minimum.at(new, ra, low)
        np.minimum.at(new, rb, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, parent):
            break
        parent = new
    roots, labels = np.unique(parent, return_inverse=True)
    return len(roots), labels.reshape(-1)


def _signatures(order: list[str], unit_of: Mapping[str, np.ndarray], n_units: int) -> np.ndarray:
    """Group id of each unit: units touching the same set of values share one (ids in order of first value)."""
    labs, vals = [], []
    for i, v in enumerate(order):
        u = np.unique(unit_of[v])
        labs.append(u)
        vals.append(np.full(len(u), i))
    lab, val = np.concatenate(labs), np.concatenate(vals)
    idx = np.lexsort((val, lab))
    lab, val = lab[idx], val[idx]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sig_id: dict[tuple[int, ...], int] = {}
    sig_of_unit = np.empty(n_units, np.int64)
    sigs = np.split(val, starts[1:])
    for u, s in zip(lab[starts], sigs):
        sig_of_unit[u] = sig_id.setdefault(tuple(s.tolist()), len(sig_id))
    # number groups by the first value they touch (graph order), then by signature
    first = {sid: sig[0] for sig, sid in sig_id.items()}
    ranked = sorted(sig_id.values(), key=lambda sid: (first[sid], sid))
    renum = np.empty(len(ranked), np.int64)
    renum[ranked] = np.arange(len(ranked))
    return renum[sig_of_unit]


def _groups(g: Graph, maps: Mapping[str, ChannelMap], axes: Mapping[str, int | None],
            unit_of: Mapping[str, np.ndarray], n_units: int, blocked_unit: np.ndarray,
            unit_blockers: list[tuple[np.ndarray, Blocker]]) -> tuple[tuple[Group, ...], np.ndarray]:
    order = [v for v in [*g.input_names, *(o for n in g.nodes for o in n.outputs)] if v in unit_of]
    if not order:
        return (), np.zeros(0, np.int64)
    group_of = _signatures(order, unit_of, n_units)
    n_groups = int(group_of.max()) + 1
    gvalues: list[list[str]] = [[] for _ in range(n_groups)]
    groups_of_value: dict[str, np.ndarray] = {}
    for v in order:
        gs = np.unique(group_of[unit_of[v]])
        groups_of_value[v] = gs
        for gid in gs:
            gvalues[gid].append(v)
    producers: list[list[str]] = [[] for _ in range(n_groups)]
    consumers: list[list[str]] = [[] for _ in range(n_groups)]
    through: list[list[str]] = [[] for _ in range(n_groups)]
    members: list[list[MemberRef]] = [[] for _ in range(n_groups)]
    ref: list[str | None] = [None] * n_groups
    for n in g.nodes:
        cm = maps[n.name]
        made = {n.outputs[j] for j in cm.produces}
        for o in n.outputs:
            for gid in groups_of_value.get(o, ()):
                if o in made:
                    producers[gid].append(n.name)
                    ref[gid] = ref[gid] or o
                elif n.name not in through[gid]:
                    through[gid].append(n.name)
        for slot in cm.consumes:
            for gid in groups_of_value.get(n.inputs[slot], ()):
                if n.name not in consumers[gid]:
                    consumers[gid].append(n.name)
        for m in cm.members:
            v = _port_value(n, m.port)
            for gid in groups_of_value.get(v, ()):
                members[gid].append(MemberRef(n.name, m.slot, n.inputs[m.slot], m.axis, v, m.role))
    gblockers: list[dict[Blocker, None]] = [{} for _ in range(n_groups)]
    for units, who in unit_blockers:
        for gid in np.unique(group_of[units]):
            gblockers[gid][who] = None
    bounds = np.cumsum(np.bincount(group_of, minlength=n_groups))[:-1]
    unit_lists = np.split(np.argsort(group_of, kind="stable"), bounds)
    groups = []
    for gid in range(n_groups):
        units = unit_lists[gid]
        reference = ref[gid] or gvalues[gid][0]
        widths = np.bincount(unit_of[reference], minlength=n_units)[units]
        groups.append(Group(gid, tuple(gvalues[gid]), units, widths, blocked_unit[units], reference,
                            tuple(producers[gid]), tuple(consumers[gid]), tuple(through[gid]), tuple(members[gid]),
                            tuple(gblockers[gid])))
    return tuple(groups), group_of


def format_groups(g: Graph, a: Analysis, limit: int = 8) -> str:
    """The text `slimc inspect --show-groups` prints: one block per group, what it spans and what blocks it."""
    nodes = {n.name: n for n in g.nodes}

    def names(xs: tuple[str, ...]) -> str:
        shown = [node_label(nodes[x]) for x in xs[:limit]]
        return " ".join(shown) + (f" (+{len(xs) - limit} more)" if len(xs) > limit else "") if xs else "-"

    prunable = [gr for gr in a.groups if not gr.is_blocked]
    lines = [f"channel groups: {len(a.groups)} ({len(prunable)} prunable, {len(a.groups) - len(prunable)} blocked); "
             f"{a.num_units} units, {sum(gr.channels for gr in prunable)} prunable channels"]
    for gr in a.groups:
        n_blocked = int(gr.blocked.sum())
        state = "blocked" if gr.is_blocked else "prunable" if not n_blocked else \
            f"prunable ({n_blocked} of {len(gr.units)} units blocked)"
        unit_note = "" if len(gr.units) == gr.channels else f" in {len(gr.units)} units"
        lines.append(f"group {gr.id}: {gr.channels} channels{unit_note} of %{gr.reference}, {state}")
        lines.append(f"  producers: {names(gr.producers)}")
        lines.append(f"  consumers: {names(gr.consumers)}")
        lines.append(f"  through:   {names(gr.through)}")
        for b in gr.blockers:
            lines.append(f"  blocked by {b}")
    return "\n".join(lines)
