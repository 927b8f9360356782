"""Speed and agreement together: slimc's int8 builds of the pretrained models against ONNX Runtime, in one run.

bench/fidelity.py measures each method's top-1 agreement and logit SQNR on the natural-image crops and saves the
integer graph of every slimc row (and the ORT int8 model of every ORT row). This script compiles those graphs for
this machine (`slimc compile GRAPH --input-shape 1,3,H,W --trials N`) and times them (`slimc measure` in
`--processes` fresh processes each, the median of their medians), and times the ORT models, ONNX Runtime fp32 and
PyTorch eager on one crop, batch 1, in the same run; the table puts each build's latency next to its agreement. Run
it alone (timings on a shared 2-core box are worthless), after bench/fidelity.py:
    .venv/bin/python bench/tradeoff.py --fidelity bench/results/fidelity.json [--trials 0]
Writes bench/results/tradeoff.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _rows(paths: list[str]) -> dict[str, list[dict]]:
    """Rows per image model from bench/fidelity.py result files (later files win for the same method)."""
    out: dict[str, dict[str, dict]] = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                if "fp32_accuracy" in r["reference"]:  # the labelled MNIST case: not a zoo model
                    continue
                for row in r["rows"]:
                    out.setdefault(r["model"], {})[row["method"]] = row
    return {m: list(rows.values()) for m, rows in out.items()}


def _slimc(*args: str) -> str:
    """Run the slimc CLI in a fresh process (nothing of this one's thread pools around); its stdout."""
    cmd = [sys.executable, "-m", "slimc.cli", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr.strip()}")
    return p.stdout


def _compile(graph: str, shape: tuple[int, ...], out_dir: str, trials: int) -> dict:
    """`slimc compile` of a saved integer graph (not timed); its meta.json (quantization, tuning)."""
    _slimc("compile", graph, "--input-shape", ",".join(map(str, shape)), "--trials", str(trials), "--no-measure",
           "-o", out_dir)
    with open(os.path.join(out_dir, "meta.json")) as f:
        return json.load(f)


def _measure(out_dir: str, args) -> dict:
    """`slimc measure --json` of an artifact in `args.processes` fresh processes: the median of their medians, and
    each process's median, p10 and p90 (ms). This 2-vCPU box has stretches of seconds in which a 2-thread run gets
    no help from its second thread (README, tradeoff table), so one short process can land in one."""
    runs = [json.loads(_slimc("measure", out_dir, "--json", "--repeat", str(args.repeat), "--number",
                              str(args.number), "--warmup", str(args.warmup))) for _ in range(args.processes)]
    medians = [r["median_ms"] for r in runs]
    return {"median_ms": float(np.median(medians)), "min_ms": min(medians), "max_ms": max(medians),
            "processes": [{k: r[k] for k in ("median_ms", "p10_ms", "p90_ms")} for r in runs]}


def bench_model(name: str, rows: list[dict], args) -> list[dict]:
    import torch

    from latency import timed
    from slimc import evalset, zoo
    from slimc.ort_quant import ort_session

    module = getattr(zoo, name)()
    split = evalset.for_model(module, 1, 1)
    x = split.evaluation.arrays[0][:1]
    out = []
    with torch.no_grad():
        xt = torch.from_numpy(x)
        out.append({"method": "PyTorch eager fp32", "latency": timed(lambda: module(xt), args)})
    graphs = [r for r in rows if "graph" in r]
    onnx_fp32 = os.path.join(os.path.dirname(graphs[0]["graph"]), f"{name}.fp32.onnx") if graphs else None
    ort_models = [(r, os.path.join(HERE, r["model"])) for r in rows if "model" in r]
    for row, path in ([({"method": "ORT fp32"}, onnx_fp32)] if onnx_fp32 else []) + ort_models:
        sess = ort_session(path, args.threads)
        feed = {sess.get_inputs()[0].name: x}
        out.append({**_summary(row), "latency": timed(lambda: sess.run(None, feed), args)})
        del sess  # its spinning thread pool would share the cores with what is timed next
    builds = []
    fp32 = os.path.join(args.work, f"{name}-slimc-fp32")
    _slimc("compile", f"slimc.zoo:{name}", "--trials", str(args.trials), "--no-measure", "-o", fp32)
    with open(os.path.join(fp32, "meta.json")) as f:
        builds.append(({"method": "slimc fp32"}, fp32, json.load(f)))
    for row in graphs:  # every build first, then every timing: nothing compiles while something is timed
        slug = re.sub(r"[^A-Za-z0-9]+", "-", row["method"]).strip("-")
        out_dir = os.path.join(args.work, f"{name}-{slug}")
        builds.append((row, out_dir, _compile(row["graph"], x.shape, out_dir, args.trials)))
    for row, out_dir, meta in builds:
        q = meta.get("quantization") or {}
        out.append({**_summary(row), "latency": _measure(out_dir, args), "int8_mac_share": q.get("int8_mac_share"),
                    "int16_mac_share": q.get("int16_mac_share"), "float_layers": len(q.get("float_layers", [])),
                    "int8_dot_instructions": q.get("int8_dot_instructions"), "tuning": meta["tuning"]})
    return out


def _summary(row: dict) -> dict:
    """What a fidelity row contributes to its latency row: the method and its accuracy figures."""
    keep = ("method", "top1_agreement", "sqnr_mean_db")
    return {k: row[k] for k in keep if k in row}


def table(results: dict[str, list[dict]]) -> str:
    """One line per build: agreement and SQNR (from bench/fidelity.py) next to its latency here."""
    lines = [f"{'model':18s} {'method':44s} {'agreement':>9s} {'SQNR':>7s} {'int MACs (u8+u16)':>18s} "
             f"{'latency':>9s} {'vs ORT int8':>11s} slimc processes (min-max ms)"]
    lines.append("-" * len(lines[0]))
    for model, rows in results.items():
        ort = next((r["latency"]["median_ms"] for r in rows if r["method"] == "ORT int8 minmax"), None)
        for r in rows:
            ms = r["latency"]["median_ms"]
            agree = f"{r['top1_agreement']:.2%}" if "top1_agreement" in r else "-"
            sqnr = f"{r['sqnr_mean_db']:.1f}" if "sqnr_mean_db" in r else "-"
            share = (f"{r['int8_mac_share']:.0%}+{r.get('int16_mac_share') or 0:.0%}"
                     if r.get("int8_mac_share") is not None else "-")
            rel = f"{ort / ms:.2f}x" if ort else "-"
            spread = f"{r['latency']['min_ms']:.2f}-{r['latency']['max_ms']:.2f}" if "min_ms" in r["latency"] else ""
            lines.append(f"{model:18s} {r['method'][:44]:44s} {agree:>9s} {sqnr:>7s} {share:>18s} {ms:7.2f}ms {rel:>11s}"
                         f" {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fidelity", default=os.path.join(HERE, "results", "fidelity.json"),
                   help="bench/fidelity.py result files (comma-separated)")
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per build (only untuned workloads)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime threads")
    p.add_argument("--work", default=os.path.join(HERE, "results", "work", "tradeoff"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "tradeoff.json"))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--number", type=int, default=5)
    p.add_argument("--processes", type=int, default=3,
                   help="fresh `slimc measure` processes per slimc build (the median of their medians is reported)")
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error(f"--processes must be >= 1, got {args.processes}")
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    results = {m: bench_model(m, rows, args) for m, rows in _rows(args.fidelity.split(",")).items()}
    print(table(results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"trials": args.trials, "threads": args.threads, "results": results,
                   "processes": args.processes,
                   "note": "latency: medians of repeat x number calls, batch 1 (slimc builds: median over --processes "
                           "fresh processes); 'vs ORT int8' > 1: slimc is faster"},
                  f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
