"""Per-graph size and cost figures that every pipeline step reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from slimc import ops
from slimc.ir import Graph


@dataclass(frozen=True)
class GraphStats:
    """Counts for one graph: nodes, parameter elements, MACs per sample, weight bytes, ops histogram."""

    nodes: int
    params: int
    macs: int
    bytes: int
    op_counts: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)


def graph_stats(g: Graph) -> GraphStats:
    total_macs = 0
    counts: dict[str, int] = {}
    for n in g.nodes:
        total_macs += ops.macs(n.op, [g.type_of(i) for i in n.inputs], n.out_types, n.attrs)
        counts[n.op] = counts.get(n.op, 0) + 1
    return GraphStats(
        nodes=len(g.nodes),
        params=sum(t.numel() for t in g.param_types.values()),
        macs=total_macs,
        bytes=sum(t.nbytes() for t in g.param_types.values()),
        op_counts=dict(sorted(counts.items())),
    )


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (for tables)."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"
