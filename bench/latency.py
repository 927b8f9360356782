"""Latency bench: slimc fp32 (tuned) vs PyTorch eager vs ONNX Runtime fp32, batch 1, 224x224, one run, one table.

Run alone (tuning and timing on a shared 2-core box are meaningless in parallel):
    .venv/bin/python bench/latency.py --trials 96 [--models resnet18,mobilenet_v2,resnet50]
Writes bench/results/latency.json with the trial budget, tuning time and every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, args) -> dict:
    """Median/p10/p90 (ms) of `repeat` timings, each the mean of `number` calls, after `warmup` calls."""
    from slimc.targets.measure import time_callable

    lat = time_callable(fn, number=args.number, repeat=args.repeat, warmup=args.warmup)
    return {"median_ms": lat.median_ms, "p10_ms": lat.p10_ms, "p90_ms": lat.p90_ms}


def bench_model(name: str, args) -> dict:
    import onnxruntime as ort
    import torch
    import torchvision

    from slimc import export
    from slimc.compile import compile_graph
    from slimc.frontend.torch import from_torch
    from slimc.models import LoadedModel
    from slimc.pass_manager import PassManager, compare

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    xn = x.numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    row: dict = {"model": name, "threads": torch.get_num_threads()}

    with torch.no_grad():
        row["pytorch"] = timed(lambda: model(x), args)

    graph = from_torch(model, (x,), name=name)
    onnx_path = os.path.join(args.work, f"{name}.onnx")
    export.to_onnx(graph, onnx_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: xn}
    row["ort_fp32"] = timed(lambda: sess.run(None, feed), args)
    row["ort_fp32"]["max_rel_vs_pytorch"] = compare(sess.run(None, feed), [ref]).max_rel

    pm = PassManager("canonicalize,fold-bn,fuse-act")
    final, records = pm.run(graph)
    loaded = LoadedModel(f"torchvision:{name}", graph, lambda inputs: [ref], "PyTorch eager")
    t0 = time.perf_counter()
    result = compile_graph(loaded, pm.pipeline, final, records, target="native", mcpu=None, mattr=None,
                           trials=args.trials, tune_db=args.tune_db, tune_ops=args.tune_ops, measure=True,
                           out_dir=os.path.join(args.work, f"{name}-fp32"), sample=[xn])
    meta = result.meta
    row["slimc_fp32"] = {k: meta["latency"][k] for k in ("median_ms", "p10_ms", "p90_ms")}
    row["slimc_fp32"]["max_rel_vs_ir"] = meta["check"]["max_rel"]
    row["slimc_fp32"]["compile_seconds"] = time.perf_counter() - t0
    row["tuning"] = meta["tuning"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    p.add_argument("--trials", type=int, default=96, help="MetaSchedule trials per model (only untuned workloads)")
    p.add_argument("--tune-ops", default="",
                   help="tune only tasks whose name has one of these words (comma-separated; default: all untemplated)")
    p.add_argument("--tune-db", default=os.path.join(HERE, "results", "tune-db"), help="tuning database dir")
    p.add_argument("--work", default=os.path.join(HERE, "results", "work"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "latency.json"))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--number", type=int, default=5)
    args = p.parse_args(argv)
    args.tune_ops = [o for o in args.tune_ops.split(",") if o] or None
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args))
    header = f"{'model':14s} {'PyTorch':>9s} {'ORT fp32':>9s} {'slimc fp32':>11s} {'vs PyTorch':>11s} {'vs ORT':>7s}  tuning"
    print(header)
    print("-" * len(header))
    for r in rows:
        pt, ort_, sl = r["pytorch"]["median_ms"], r["ort_fp32"]["median_ms"], r["slimc_fp32"]["median_ms"]
        t = r["tuning"]
        print(f"{r['model']:14s} {pt:8.2f}ms {ort_:8.2f}ms {sl:10.2f}ms {pt / sl:10.2f}x {ort_ / sl:6.2f}x  "
              f"{t['tasks_tuned']} tasks / {t['trials']} trials / {t['seconds']:.0f}s this run, "
              f"{t['tasks_reused']} reused")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"trials": args.trials, "tune_ops": args.tune_ops, "rows": rows,
                   "note": "ratios > 1 mean slimc is faster; medians over repeat x number calls"}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
