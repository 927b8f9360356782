"""Human-readable reports: the per-pass table that `slimc inspect` prints."""

from __future__ import annotations

from collections.abc import Sequence

from slimc.pass_manager import StepRecord
from slimc.stats import human


def _fmt_err(r: StepRecord) -> tuple[str, str]:
    if r.fidelity is None:
        return "-", "-"
    f = r.fidelity
    sqnr = "inf" if f.sqnr_db == float("inf") else f"{f.sqnr_db:.1f}"
    return f"{f.max_rel:.1e}", sqnr


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A plain aligned text table."""
    right = right or [False] * len(headers)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def pipeline_table(model: str, reference: str, pipeline: str, records: Sequence[StepRecord]) -> str:
    """One row per step: pass, time, nodes, params, MACs, bytes, error vs the reference model."""
    headers = ["step", "pass", "time", "nodes", "params", "MACs", "bytes", "max err/range", "SQNR dB"]
    rows = []
    for r in records:
        err, sqnr = _fmt_err(r)
        rows.append([str(r.index), r.name + ("" if r.changed or r.index == 0 else " (no change)"),
                     f"{r.seconds * 1e3:.0f} ms", str(r.stats.nodes), human(r.stats.params),
                     human(r.stats.macs), human(r.stats.bytes, "B"), err, sqnr])
    final = records[-1].stats.op_counts
    ops = ", ".join(f"{k}×{v}" for k, v in sorted(final.items(), key=lambda kv: (-kv[1], kv[0])))
    head = f"model: {model}\nreference: {reference}\npipeline: {pipeline or '(none)'}\n"
    return head + table(headers, rows, [True, False, True, True, True, True, True, True, True]) + f"\nfinal ops: {ops}"
