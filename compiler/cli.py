"""The `slimc` command line; heavy imports (torch, onnx, tvm) happen inside commands so --help is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

DEFAULT_PIPELINE = "canonicalize,fold-bn,fuse-act"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a .onnx, .pt2 or .slimc file, 'package.module:callable' returning an nn.Module, "
                        "or 'torchvision:<name>' (random weights)")
    p.add_argument("--input-shape", action="append", metavar="1,3,224,224",
                   help="input shape (repeat for several inputs); default: the model's own, else 1,3,224,224")
    p.add_argument("--dynamic-batch", action="store_true", help="import torch models with a symbolic batch dim N")
    p.add_argument("--passes", default=DEFAULT_PIPELINE, metavar="PIPELINE",
                   help=f"pass pipeline, e.g. 'canonicalize,fold-bn,fuse-act' (default: {DEFAULT_PIPELINE}; '' for none)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    spec = ("a folder of images ('DIR' or 'DIR:resize=256,crop=224,mean=...,std=...'; labels from sub-folders), "
            "an .npy/.npz file, or 'package.module:callable' yielding batches")
    p.add_argument("--data", metavar="SPEC",
                   help=f"data for passes that run the model (the --max-drop budget; bn-reestimate and distill without "
                        f"--train; calibration without --calib): {spec}")
    p.add_argument("--calib", metavar="SPEC",
                   help="calibration data for quantization, same forms as --data (default: --data)")
    p.add_argument("--train", metavar="SPEC",
                   help="data the training passes learn from (distill, --qat, bn-reestimate), same forms as --data "
                        "(default: --data); --data then stays held out for the checks (the --max-drop budget)")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="native", metavar="TRIPLE|PRESET",
                   help="LLVM triple (x86_64-linux-gnu, aarch64-linux-gnu) or a preset from `slimc targets` "
                        "(default: native)")
    p.add_argument("--mcpu", help="CPU name as LLVM knows it (e.g. cascadelake, cortex-a76)")
    p.add_argument("--mattr", help="comma-separated features, e.g. +neon,+dotprod")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimc",
        description="slimc: a hardware-aware, compiler-style optimizer for CNNs (import, inspect, transform, export).")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="import a model, run a pass pipeline and report what every pass did",
                       description="Import MODEL, run the pipeline with verification and a numeric check against "
                                   "the original model after every pass, and print a per-pass table.")
    _add_model_args(p)
    p.add_argument("--dump-dir", metavar="DIR",
                   help="write NN_<pass>/{ir.txt,diff.txt,model.onnx,graph.dot,stats.json} per step")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-changed", action="store_true", help="print the IR after every pass that changed it")
    p.add_argument("--json", action="store_true", help="print the per-pass records as JSON instead of a table")
    p.add_argument("--inputs", metavar="FILE.npy|.npz",
                   help="sample inputs for the numeric check (default: seeded random data of the input shape)")
    p.add_argument("--no-check", action="store_true", help="skip the numeric check against the original model")
    p.add_argument("--save", metavar="OUT.slimc", help="save the final graph with its weights")
    p.add_argument("--show-groups", action="store_true",
                   help="print the final graph's channel-pruning groups: members and what blocks them")
    _add_data_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="run a pipeline and write the result as .onnx, .pt2 or .slimc",
                       description="Import MODEL, run the pipeline, and write the graph; the format follows "
                                   "the output's extension.")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="output file: *.onnx, *.pt2 or *.slimc")
    _add_data_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", help="optimize, lower with TVM, tune and build a deployable artifact",
                       description="Import MODEL, run the pipeline, lower it to TVM Relax for the target, tune the "
                                   "workloads missing from the tuning database, build, check the artifact against "
                                   "the IR and measure its latency (on this machine, when the target is the host).")
    _add_model_args(p)
    _add_target_args(p)
    p.add_argument("--trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials in total for the workloads not yet in the database (default 0: "
                        "use the database only)")
    p.add_argument("--tune-db", metavar="DIR", help="tuning database dir (default: per target under ~/.cache/slimc)")
    p.add_argument("--tune-ops", metavar="OPS", help="only tune tasks whose name contains one of these, e.g. conv,matmul")
    p.add_argument("--no-measure", action="store_true", help="skip the latency measurement")
    p.add_argument("--compare", action="store_true",
                   help="also time the original model (PyTorch eager / ONNX Runtime) on the same inputs")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--int8", action="store_true",
                   help="quantize to int8: appends calibrate,quantize,round-weights,bias-correct to the pipeline "
                        "(needs --calib or --data)")
    p.add_argument("--eval", metavar="SPEC",
                   help="data (same forms as --data) on which to report the artifact's top-1 agreement with the "
                        "original model (e.g. slimc.evalset:lite_evaluation)")
    p.add_argument("--calib-method", default="mse", metavar="M",
                   help="calibration method with --int8: minmax, moving_average, percentile, entropy, mse (default: "
                        "with bias correction the most faithful in bench/fidelity.py)")
    p.add_argument("--max-drop", type=float, metavar="D",
                   help="with --int8: put the most sensitive layers back in float until top-1 agreement with the float "
                        "model (or --metric) on --data (else --calib) drops by at most D, e.g. 0.02")
    p.add_argument("--sqnr-floor", type=float, metavar="DB",
                   help="with --int8: put the most sensitive layers back in float until the outputs' SQNR against the "
                        "float model is at least DB")
    p.add_argument("--metric", metavar="MODULE:FN",
                   help="with --max-drop: judge the drop by fn(logits, labels) -> float (higher is better) on labelled "
                        "--data instead of top-1 agreement")
    p.add_argument("--fallback-to", choices=("float", "int16", "int16+float"), default="float",
                   help="what --max-drop/--sqnr-floor do to a sensitive layer: put it back in float (default); keep "
                        "its int8 weights and integer kernel and give the activations it reads a 16-bit grid "
                        "(int16); or int16 first and float for the layers whose int8 weights still miss the budget "
                        "(int16+float)")
    p.add_argument("--qat", type=int, metavar="EPOCHS",
                   help="with --int8: fine-tune the int8 model quantization-aware for EPOCHS passes over --train, "
                        "else --data, else --calib (distill from the float model through fake quantization, "
                        "straight-through gradients; after any fallback), e.g. --qat 2 --train "
                        "slimc.evalset:imagenet_training")
    _add_data_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("measure", help="measure the latency of a compiled artifact, locally or through an RPC tracker")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker to reserve a board from")
    p.add_argument("--key", help="device key registered with the tracker (with --rpc)")
    p.add_argument("--repeat", type=int, default=30, help="timed repeats (default 30)")
    p.add_argument("--number", type=int, default=10, help="calls averaged per repeat (default 10)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--profile", action="store_true",
                   help="also time every kernel call of one inference alone and list where the time goes (local only)")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("verify", help="rerun a compiled artifact (here or under qemu-aarch64) and compare with the IR",
                       description="Recompute the reference with the IR interpreter from DIR/model.slimc on the inputs "
                                   "in DIR/check.npz, run DIR/model.so on them (on this machine, or with --qemu under "
                                   "qemu-aarch64 in a cached arm64 rootfs) and compare. Exits 1 on a mismatch. qemu "
                                   "timings are emulation speed, never latency.")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--qemu", action="store_true",
                   help="run an AArch64 artifact under qemu-aarch64 (the first run builds the rootfs: root, network to "
                        "the Debian mirror and PyPI; needs `make cross-tools`)")
    p.add_argument("--tol", type=float, default=None, metavar="REL",
                   help="max abs error allowed, relative to the output range (default 1e-4, for fp32)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("targets", help="list target presets and what LLVM says their ISA has")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.set_defaults(func=cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from slimc.errors import SlimcError

    try:
        return int(args.func(args) or 0)
    except SlimcError as e:
        if args.debug:
            raise
        print(f"slimc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("slimc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure is a bug in slimc: say so, and how to get details
        if args.debug:
            raise
        print(f"slimc: internal error: {type(e).__name__}: {e}. This is a bug in slimc; rerun with --debug "
              "for the traceback and report it.", file=sys.stderr)
        return 70


def _load(args: argparse.Namespace):
    from slimc.models import load_model, parse_shape

    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
    return load_model(args.model, shapes, dynamic_batch=args.dynamic_batch)


def _sample_inputs(args: argparse.Namespace, loaded) -> list:
    import numpy as np

    from slimc import interpreter
    from slimc.errors import ShapeError

    graph = loaded.graph
    if not getattr(args, "inputs", None):
        return list(loaded.sample) if loaded.sample is not None else interpreter.example_inputs(graph, seed=0)
    try:
        loaded = np.load(args.inputs)
    except (OSError, ValueError) as e:
        raise ShapeError(f"cannot read --inputs {args.inputs}: {e}; pass a .npy array or an .npz archive") from None
    arrays = [loaded[k] for k in loaded.files] if hasattr(loaded, "files") else [loaded]
    arrays = [a.astype(t.dtype) for a, (_, t) in zip(arrays, graph.inputs)]
    interpreter.check_inputs(graph, arrays)
    return arrays


def _load_data(args: argparse.Namespace, graph):
    """(data, calib, train) from --data/--calib/--train: passes read `data` (--data, else --calib), calibration
    `calib`, training passes `train`."""
    from slimc.data import load_data

    data, calib, train = (load_data(spec, graph, flag) if spec else None
                          for spec, flag in ((getattr(args, "data", None), "--data"),
                                             (getattr(args, "calib", None), "--calib"),
                                             (getattr(args, "train", None), "--train")))
    return (data if data is not None else calib), calib, train


def _progress(msg: str) -> None:
    """Passes' progress and notes (calibration batches, fallback attempts) go to stderr as they happen."""
    print(msg, file=sys.stderr, flush=True)


def _run_pipeline(args: argparse.Namespace, check: bool, target=None, **instrument_kw):
    from slimc.pass_manager import Instruments, PassContext, PassManager

    loaded = _load(args)
    pm = PassManager(args.passes)  # parse (and reject a bad pipeline) before any heavy work
    data, calib, train = _load_data(args, loaded.graph)
    reference = None
    sample = _sample_inputs(args, loaded)
    if check:
        reference = (sample, loaded.oracle(sample))
    pm = PassManager(pm.specs, Instruments(reference=reference, **instrument_kw),
                     PassContext(sample_inputs=sample, target=target, data=data, calib=calib, train=train,
                                 log=_progress))
    graph, records = pm.run(loaded.graph)
    return loaded, pm, graph, records, sample


def cmd_inspect(args: argparse.Namespace) -> int:
    from slimc import ir, report

    if args.dump_dir:
        args.dump_dir = os.path.abspath(args.dump_dir)
    loaded, pm, graph, records, _ = _run_pipeline(
        args, check=not args.no_check, dump_dir=args.dump_dir, print_after_all=args.print_after_all,
        print_changed=args.print_changed)
    if args.save:
        ir.save(graph, args.save)
    if args.json:
        print(json.dumps({"model": loaded.spec, "reference": loaded.oracle_name, "pipeline": pm.pipeline,
                          "steps": [r.to_json() for r in records]}, indent=2))
        return 0
    print(report.pipeline_table(loaded.spec, loaded.oracle_name, pm.pipeline, records))
    if args.show_groups:
        from slimc.passes.prune.dependency import analyze, format_groups

        print(format_groups(graph, analyze(graph)))
    if args.dump_dir:
        print(f"per-pass dumps: {args.dump_dir}")
    if args.save:
        print(f"saved: {args.save}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slimc import export, ir
    from slimc.errors import SlimcError

    out = args.output
    ext = os.path.splitext(out)[1].lower()
    writers = {".onnx": export.to_onnx, ".pt2": export.to_pt2, ".slimc": ir.save}
    if ext not in writers:
        raise SlimcError(f"cannot tell the export format of {out!r}: use a .onnx, .pt2 or .slimc file name")
    loaded, pm, graph, records, _ = _run_pipeline(args, check=True)
    writers[ext](graph, out)
    fid = records[-1].fidelity
    err = f" (max error vs {loaded.oracle_name}: {fid.max_rel:.2e} of output range)" if fid else ""
    print(f"wrote {out}: {records[-1].stats.nodes} nodes after '{pm.pipeline or '(no passes)'}'{err}")
    return 0


#: recovery passes --int8 runs after quantize: GPTQ weight rounding, then bias correction (see bench/fidelity.py for
#: what each is worth)
INT8_RECOVERY = ("round-weights", "bias-correct")
#: --qat EPOCHS: distill on the QDQ graph trains it quantization-aware; Adam at a step well below the int8 weight
#: grids and plain KL (temperature 1) to the float model: faster settings overfit the bundled training crops
#: (README, the fidelity table's QAT rows)
QAT_DISTILL = "distill{{epochs={epochs},optimizer=adam,lr=1e-5,batch_size=32,temperature=1,alpha=1}}"


def backend_pipeline(passes: str, int8: bool, calib_method: str, max_drop: float | None = None,
                     sqnr_floor: float | None = None, metric: str | None = None, fallback_to: str = "float",
                     qat: int | None = None) -> str:
    """The pipeline compile runs: --int8 adds calibration, QDQ, GPTQ rounding, bias correction and, given an accuracy
    budget, fallback (float, or int16 activations) of the most sensitive layers, then optional quantization-aware
    fine-tuning; QDQ is always folded into integer ops."""
    from slimc.errors import SlimcError

    budget = []
    if max_drop is not None:
        if not 0.0 <= max_drop <= 1.0:
            raise SlimcError(f"--max-drop {max_drop} is outside [0, 1]: it is the largest drop of top-1 agreement with "
                             "the float model (or of --metric) to accept, e.g. 0.02 for two points")
        budget.append(f"max_drop={max_drop}")
    if sqnr_floor is not None:
        if not sqnr_floor > 0.0:
            raise SlimcError(f"--sqnr-floor {sqnr_floor} must be a positive number of dB, e.g. 30: the smallest SQNR "
                             "of the int8 model's outputs against the float model's to accept")
        budget.append(f"sqnr_floor={sqnr_floor}")
    if metric is not None:
        if max_drop is None or any(c in metric for c in ",{}=") or ":" not in metric:
            raise SlimcError(f"--metric {metric!r} needs --max-drop (the drop it is judged by) and must name "
                             "'package.module:callable' computing fn(logits, labels) -> float, higher is better")
        budget.append(f"metric={metric}")
    if fallback_to != "float":
        if not budget:
            raise SlimcError(f"--fallback-to {fallback_to} says what the accuracy budget does to sensitive layers; "
                             "give the budget too (--max-drop or --sqnr-floor)")
        budget.append(f"to={fallback_to}")
    if budget and not int8:
        raise SlimcError("--max-drop, --sqnr-floor and --metric set the accuracy budget of int8 quantization; "
                         "add --int8 (or drop them)")
    if qat is not None and (qat < 1 or not int8):
        raise SlimcError(f"--qat {qat}: fine-tuning is for the --int8 pipeline and takes a number of epochs >= 1 "
                         "(passes over --train), e.g. --int8 --qat 2")
    names = [p.split("{")[0].strip() for p in passes.split(",") if p.strip()]
    if int8 and "quantize" not in names:
        steps = [f"calibrate{{method={calib_method}}}", "quantize", *INT8_RECOVERY]
        if budget:
            steps.append(f"quant-fallback{{{','.join(budget)}}}")
        if qat is not None:
            steps.append(QAT_DISTILL.format(epochs=qat))
        passes = ",".join(filter(None, [passes.strip(), *steps]))
        names += [s.split("{")[0] for s in steps]
    elif budget or qat is not None:
        raise SlimcError("--passes already quantizes, so --max-drop/--sqnr-floor/--metric/--qat cannot place their "
                         "passes: add quant-fallback{max_drop=...} or distill{...} after quantize in --passes instead")
    if "quantize" in names and "fold-qdq" not in names[names.index("quantize"):]:
        passes += ",fold-qdq"
    return passes


def cmd_compile(args: argparse.Namespace) -> int:
    from slimc import compile as slimc_compile

    if args.trials < 0:
        from slimc.errors import SlimcError

        raise SlimcError(f"--trials must be >= 0, got {args.trials}")
    args.passes = backend_pipeline(args.passes, args.int8, args.calib_method, args.max_drop, args.sqnr_floor,
                                   args.metric, args.fallback_to, args.qat)  # a bad flag fails before TVM loads
    from slimc.targets.triple import resolve

    from slimc.data import load_data

    target = resolve(args.target, args.mcpu, args.mattr)  # passes see it too (e.g. prune's round_to)
    loaded, pm, graph, records, sample = _run_pipeline(args, check=True, target=target)
    result = slimc_compile.compile_graph(
        loaded, pm.pipeline, graph, records, target=target, mcpu=None, mattr=None,
        trials=args.trials, tune_db=args.tune_db,
        tune_ops=[o.strip() for o in args.tune_ops.split(",")] if args.tune_ops else None,
        measure=not args.no_measure, out_dir=args.output, sample=sample, compare_baselines=args.compare,
        calibration=pm.context.calibration_data if "quantize" in pm.pipeline else None,
        eval_data=load_data(args.eval, loaded.graph, "--eval") if args.eval else None)
    print(result.summary())
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from slimc import compile as slimc_compile

    if args.profile:
        prof = slimc_compile.profile_artifact(args.artifact, rpc=args.rpc, repeat=args.repeat, number=args.number,
                                              warmup=args.warmup)
        print(json.dumps(prof.to_json(), indent=2) if args.json else "\n".join([f"{args.artifact}:", *prof.lines()]))
        return 0
    lat = slimc_compile.measure_artifact(args.artifact, rpc=args.rpc, key=args.key, repeat=args.repeat,
                                         number=args.number, warmup=args.warmup)
    print(json.dumps(lat.to_json(), indent=2) if args.json else f"{args.artifact}: {lat}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from slimc import verify

    result = verify.verify(args.artifact, qemu=args.qemu,
                           tolerance=verify.FP32_TOLERANCE if args.tol is None else args.tol)
    print("\n".join(result.lines()), flush=True)
    if not result.ok:
        raise verify.MismatchError(verify.mismatch_message(result))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from slimc.report import table
    from slimc.targets.triple import PRESETS, resolve

    rows = []
    for name, p in PRESETS.items():
        t = resolve(name)
        rows.append([name, t.triple, t.mcpu, ",".join(t.mattr) or "-", " ".join(t.isa_summary()),
                     t.int8_dot or "none", p.description])
    print(table(["preset", "triple", "mcpu", "mattr", "ISA", "int8 dot", "notes"], rows))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from slimc.pass_manager import PASSES, load_builtin_passes

    load_builtin_passes()
    for name in sorted(PASSES):
        info = PASSES[name]
        print(f"{name:16s} {info.doc}")
        for oname, o in info.options.items():
            print(f"  {oname}: {o.type.__name__} = {o.default!r}  {o.help}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
