"""Latency bench: slimc fp32 and int8 vs PyTorch eager vs ONNX Runtime fp32 and int8, batch 1, 224x224, one run.

Both int8 models calibrate on the same natural-image crops (slimc.evalset): slimc with its calibrate pass, ONNX
Runtime with quantize_static (QDQ, per-channel s8 weights, u8 activations). Run alone (tuning and timing on a
shared 2-core box are meaningless in parallel):
    .venv/bin/python bench/latency.py --trials 96 [--models resnet18,mobilenet_v2,resnet50] [--no-int8]
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
    from slimc.targets.measure import host_threads

    row: dict = {"model": name, "threads": torch.get_num_threads(), "slimc_threads": host_threads()}

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
    if args.int8:
        bench_int8(name, graph, loaded, onnx_path, xn, ref, row, args)
    return row


def bench_int8(name: str, graph, loaded, onnx_path: str, xn, ref, row: dict, args) -> None:
    """slimc int8 (calibrate, quantize, fold-qdq, VNNI kernels) and ORT int8 on the same calibration crops."""
    from slimc import evalset
    from slimc.compile import compile_graph
    from slimc.ort_quant import ort_session, quantize_with_ort
    from slimc.pass_manager import PassContext, PassManager, compare
    from slimc.targets.triple import resolve

    calib = evalset.split(args.calib_samples, 1).calibration
    t0 = time.perf_counter()
    ort_path = os.path.join(args.work, f"{name}-int8.onnx")
    quantize_with_ort(onnx_path, ort_path, calib, args.calib_method)
    sess = ort_session(ort_path)
    feed = {sess.get_inputs()[0].name: xn}
    row["ort_int8"] = timed(lambda: sess.run(None, feed), args)
    row["ort_int8"]["quantize_seconds"] = time.perf_counter() - t0
    row["ort_int8"]["sqnr_vs_pytorch_db"] = compare(sess.run(None, feed), [ref]).sqnr_db

    variants = [("slimc_int8", "")]
    if args.prune:
        variants.append(("slimc_int8_pruned", f"prune{{ratio={args.prune}}},"))
    for key, prune in variants:
        t0 = time.perf_counter()
        pm = PassManager(f"canonicalize,fold-bn,fuse-act,{prune}calibrate{{method={args.calib_method}}},quantize,"
                         "fold-qdq", context=PassContext(sample_inputs=[xn], data=calib, target=resolve("native")))
        final, records = pm.run(graph)
        result = compile_graph(loaded, pm.pipeline, final, records, target="native", mcpu=None, mattr=None,
                               trials=args.trials, tune_db=args.tune_db, tune_ops=args.tune_ops, measure=True,
                               out_dir=os.path.join(args.work, f"{name}-{key}"), sample=[xn])
        meta = result.meta
        row[key] = {k: meta["latency"][k] for k in ("median_ms", "p10_ms", "p90_ms")}
        row[key].update(max_rel_vs_ir=meta["check"]["max_rel"], compile_seconds=time.perf_counter() - t0,
                        sqnr_vs_pytorch_db=compare(result_outputs(result, xn), [ref]).sqnr_db,
                        macs=records[-1].stats.macs, pipeline=pm.pipeline,
                        int8_mac_share=meta["quantization"]["int8_mac_share"],
                        dot_instructions=meta["quantization"]["int8_dot_instructions"], tuning=meta["tuning"])


def result_outputs(result, xn) -> list:
    from slimc import runtime

    return runtime.load(result.out_dir).run(xn)


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
    p.add_argument("--no-int8", dest="int8", action="store_false", help="fp32 columns only")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration crops for both int8 quantizers")
    p.add_argument("--calib-method", default="minmax", help="calibration method for both (minmax, entropy, percentile)")
    p.add_argument("--prune", type=float, default=0.0,
                   help="also time slimc int8 after prune{ratio=R} (channels rounded to the target's block)")
    args = p.parse_args(argv)
    args.tune_ops = [o for o in args.tune_ops.split(",") if o] or None
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args))
    header = (f"{'model':14s} {'PyTorch':>9s} {'ORT fp32':>9s} {'slimc fp32':>11s} {'vs PyTorch':>11s} {'vs ORT':>7s}"
              f" {'ORT int8':>9s} {'slimc int8':>11s} {'int8/fp32':>10s} {'vs ORT int8':>12s}  tuning")
    print(header)
    print("-" * len(header))
    for r in rows:
        pt, ort_, sl = r["pytorch"]["median_ms"], r["ort_fp32"]["median_ms"], r["slimc_fp32"]["median_ms"]
        t = r["tuning"]
        line = f"{r['model']:14s} {pt:8.2f}ms {ort_:8.2f}ms {sl:10.2f}ms {pt / sl:10.2f}x {ort_ / sl:6.2f}x"
        if "slimc_int8" in r:
            oi, si = r["ort_int8"]["median_ms"], r["slimc_int8"]["median_ms"]
            line += f" {oi:8.2f}ms {si:10.2f}ms {sl / si:9.2f}x {oi / si:11.2f}x"
        if "slimc_int8_pruned" in r:
            p_ = r["slimc_int8_pruned"]
            line += f"  pruned int8 {p_['median_ms']:.2f}ms ({p_['macs'] / r['slimc_int8']['macs']:.0%} MACs)"
        print(f"{line}  {t['tasks_tuned']} tasks / {t['trials']} trials / {t['seconds']:.0f}s this run, "
              f"{t['tasks_reused']} reused")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"trials": args.trials, "tune_ops": args.tune_ops, "calib_samples": args.calib_samples,
                   "calib_method": args.calib_method, "rows": rows,
                   "note": "ratios > 1 mean slimc is faster; medians over repeat x number calls"}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
