"""Channel importance and selection: score every unit of a group, rank locally or globally, honour round_to/caps.

A unit's score for one member (a weight slice that follows its channels) is the criterion over that slice; each
member's scores are divided by their mean so wide and narrow layers weigh alike, then averaged over the group's
members (Torch-Pruning's "mean" reduction and normalizer). Units with all-zero slices therefore score zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimc.errors import PipelineError
from slimc.ir import Graph
from slimc.passes.prune.dependency import Analysis, Group

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")
SCOPES = ("global", "local")

#: member roles each criterion reads (weights only for l1/l2: conv/dense rows and input slices)
_ROLES = {"l1": ("producer", "consumer"), "l2": ("producer", "consumer"), "taylor": ("producer", "consumer", "bn"),
          "bn_scale": ("bn",)}


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much; `overrides` maps layer names to their own (local) ratio."""

    ratio: float = 0.3
    criterion: str = "l1"
    scope: str = "global"
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)
    max_ratio: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PipelineError(f"prune: ratio={self.ratio} must be in [0, 1)")
        if self.criterion not in CRITERIA:
            raise PipelineError(f"prune: criterion={self.criterion!r} is not one of {', '.join(CRITERIA)}")
        if self.scope not in SCOPES:
            raise PipelineError(f"prune: scope={self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.round_to < 1:
            raise PipelineError(f"prune: round_to={self.round_to} must be >= 1 (0 in the pipeline: from the target)")
        if not 0.0 < self.max_ratio <= 1.0:
            raise PipelineError(f"prune: max_ratio={self.max_ratio} must be in (0, 1]")
        for k, r in self.overrides.items():
            if not 0.0 <= r < 1.0:
                raise PipelineError(f"prune: override {k}={r} must be in [0, 1)")


def parse_names(text: str) -> tuple[str, ...]:
    """'a;b' or 'a,b' -> ('a', 'b') (';' in pipeline text, where ',' separates options)."""
    return tuple(s.strip() for s in text.replace(",", ";").split(";") if s.strip())


def parse_overrides(text: str) -> dict[str, float]:
    """'layer1.0.conv1=0.5;layer2.0.conv1=0.2' -> {name: ratio}."""
    out: dict[str, float] = {}
    for item in parse_names(text):
        name, eq, val = item.rpartition("=")
        try:
            if not eq or not name.strip():
                raise ValueError(item)
            out[name.strip()] = float(val)
        except ValueError:
            raise PipelineError(f"prune: override {item!r} is not NAME=RATIO (e.g. layer1.0.conv1=0.5)") from None
    return out


# ---- scores ------------------------------------------------------------------------------------------

def taylor_gradients(g: Graph, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """d loss / d parameter on the sample inputs; loss: cross-entropy to the model's own argmax (or 0.5 y^2)."""
    import torch

    from slimc.interpreter import GraphModule

    module = GraphModule(g, trainable=True)  # batch-norm statistics stay frozen (interpreter.statistics_params)
    xs = [torch.as_tensor(np.asarray(x)) for x in inputs]
    out = module(*xs)
    y = out[0] if isinstance(out, tuple) else out
    if y.dim() == 2 and y.shape[1] > 1:
        loss = torch.nn.functional.cross_entropy(y, y.detach().argmax(1))
    else:
        loss = 0.5 * y.pow(2).mean()
    loss.backward()
    return {name: t.grad.detach().numpy() if t.grad is not None else np.zeros(tuple(t.shape), np.float32)
            for name, t in module.named_graph_parameters().items() if t.is_floating_point()}


def _channel_scores(w: np.ndarray, axis: int, criterion: str, grad: np.ndarray | None) -> np.ndarray:
    w64 = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    if criterion == "taylor":
        assert grad is not None
        return np.abs(w64 * np.moveaxis(grad.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)).sum(1)
    if criterion == "l2":
        return (w64 ** 2).sum(1)
    return np.abs(w64).sum(1)


def group_scores(g: Graph, a: Analysis, group: Group, criterion: str, grads: Mapping[str, np.ndarray] | None = None,
                 rng: np.random.Generator | None = None) -> np.ndarray | None:
    """One score per unit of `group` (aligned with group.units), or None if no member carries the criterion."""
    n = len(group.units)
    if criterion == "random":
        return (rng or np.random.default_rng(0)).random(n)
    pos = np.full(a.num_units, -1)
    pos[group.units] = np.arange(n)
    per_member = []
    for m in group.members:
        if m.role not in _ROLES[criterion] or m.param not in g.weights:
            continue
        w = g.weights[m.param]
        if criterion in ("l1", "l2") and w.ndim < 2:
            continue  # biases say little about a channel
        s = _channel_scores(w, m.axis, criterion, grads.get(m.param) if grads else None)
        local = pos[a.unit_of[m.value]]
        mask = local >= 0
        v = np.bincount(local[mask], weights=s[mask], minlength=n)
        per_member.append(np.sqrt(v) if criterion == "l2" else v)
    if not per_member:
        return None
    normed = [v / v.mean() if v.mean() > 0 else v for v in per_member]
    return np.mean(normed, axis=0)


# ---- selection ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Selection:
    """The units to remove (bool mask over the analysis' units), how many per group, and counters for the report."""

    pruned: np.ndarray
    per_group: Mapping[int, int]
    stats: Mapping[str, Any]


def _matches(g: Graph, name: str) -> list[str]:
    return [n.name for n in g.nodes if n.name == name or name in n.source]


def _groups_of_nodes(g: Graph, a: Analysis, names: Sequence[str], what: str) -> dict[str, set[int]]:
    """Per given name: the ids of the groups holding the output channels of the nodes it names."""
    out: dict[str, set[int]] = {}
    for name in names:
        hits = _matches(g, name)
        if not hits:
            raise PipelineError(f"prune: {what} names {name!r}, which is neither a node name nor a source module "
                                "path of this graph (see `slimc inspect MODEL --show-groups`)")
        out[name] = {gr.id for h in hits for o in g.node(h).outputs for gr in a.groups_of_value(o)}
    return out


@dataclass(frozen=True, eq=False)
class _Candidate:
    """A prunable group: its prunable units in ascending score order, with widths and the most it may lose."""

    group: Group
    order: np.ndarray  # indices into group.units, best-to-prune first
    scores: np.ndarray  # sorted ascending
    cum: np.ndarray  # channels removed after pruning the first k (cum[0] = 0)
    feasible: np.ndarray  # allowed k (ascending; includes 0)

    def nearest(self, target_channels: float) -> int:
        """The allowed count whose removed channels come closest to the target (fewer on ties)."""
        removed = self.cum[self.feasible]
        return int(self.feasible[np.argmin(np.abs(removed - target_channels))])


def _candidate(gr: Group, scores: np.ndarray, config: PruneConfig) -> _Candidate:
    idx = np.flatnonzero(~gr.blocked)
    order = idx[np.argsort(scores[idx], kind="stable")]
    cum = np.r_[0, np.cumsum(gr.widths[order])]
    total = gr.channels
    min_keep = max(1, math.ceil((1.0 - config.max_ratio) * total - 1e-9))
    remaining = total - cum
    ok = remaining >= min_keep
    if config.round_to > 1:
        ok &= remaining % config.round_to == 0
    ok[0] = True
    return _Candidate(gr, order, scores[order], cum, np.flatnonzero(ok))


def select(g: Graph, a: Analysis, config: PruneConfig, sample_inputs: Sequence[np.ndarray] | None = None) -> Selection:
    """Which units to remove under `config` (see PruneConfig); never a whole group, never a blocked unit."""
    frozen = set().union(*_groups_of_nodes(g, a, config.ignore, "ignore").values()) if config.ignore else set()
    override: dict[int, float] = {}
    for name, gids in _groups_of_nodes(g, a, list(config.overrides), "overrides").items():
        for gid in gids:
            override[gid] = max(override.get(gid, 0.0), config.overrides[name])
    grads = None
    if config.criterion == "taylor":
        if not sample_inputs:
            raise PipelineError("prune: criterion=taylor needs sample inputs (PassContext.sample_inputs; "
                                "`slimc inspect --inputs FILE`)")
        grads = taylor_gradients(g, sample_inputs)
    rng = np.random.default_rng(config.seed)
    cands: list[_Candidate] = []
    unscored = 0
    for gr in a.groups:
        if gr.is_blocked or gr.id in frozen:
            continue
        scores = group_scores(g, a, gr, config.criterion, grads, rng)
        if scores is None:
            unscored += 1
            continue
        cands.append(_candidate(gr, scores, config))
    counts: dict[int, int] = {}
    for c in cands:
        if c.group.id in override:
            counts[c.group.id] = c.nearest(override[c.group.id] * c.group.channels)
    rest = [c for c in cands if c.group.id not in override]
    if config.scope == "local":
        for c in rest:
            counts[c.group.id] = c.nearest(config.ratio * c.group.channels)
    elif rest and config.ratio > 0:
        counts.update(_global_counts(rest, config.ratio))
    pruned = np.zeros(a.num_units, bool)
    removed = 0
    for c in cands:
        k = counts.get(c.group.id, 0)
        pruned[c.group.units[c.order[:k]]] = True
        removed += int(c.cum[k])
    stats = {
        "criterion": config.criterion, "scope": config.scope, "ratio": config.ratio,
        "groups": len(a.groups), "groups_blocked": sum(1 for gr in a.groups if gr.is_blocked),
        "groups_ignored": len(frozen), "groups_unscored": unscored,
        "groups_pruned": sum(1 for k in counts.values() if k > 0),
        "channels_prunable": sum(c.group.channels for c in cands), "channels_removed": removed,
    }
    return Selection(pruned, {gid: k for gid, k in counts.items() if k}, stats)


def _global_counts(cands: list[_Candidate], ratio: float) -> dict[int, int]:
    """One threshold over all groups' normalized scores, then each group's count rounded to an allowed one."""
    target = ratio * sum(c.group.channels for c in cands)
    limits = [int(c.feasible[-1]) for c in cands]  # the most each group may lose (min size, round_to)
    scores = np.concatenate([c.scores for c in cands])
    owner = np.concatenate([np.full(len(c.scores), i) for i, c in enumerate(cands)])
    rank = np.concatenate([np.arange(len(c.scores)) for c in cands])
    taken = [0] * len(cands)
    removed = 0.0
    for j in np.lexsort((rank, owner, scores)):  # ascending score; within a group, in the group's own order
        if removed >= target:
            break
        i = owner[j]
        if taken[i] < limits[i]:
            taken[i] += 1
            removed += float(cands[i].cum[taken[i]] - cands[i].cum[taken[i] - 1])
    return {c.group.id: c.nearest(float(c.cum[k])) for c, k in zip(cands, taken)}
