"""What per-channel u8 activation grids everywhere would buy the zoo models, simulated in the QDQ graph.

slimc's int8 has one u8 grid per activation tensor, except for values only depthwise convs read (one per channel,
exact in integer arithmetic). This bench asks whether per-channel grids on every activation a conv or add reads are
worth building, before anyone builds them. It changes the grids of the QDQ graph (the interpreter then computes
exactly what such an int8 model would) and measures, against fp32 PyTorch on the natural-image crops, top-1
agreement and logit SQNR for:

- `per-tensor`: slimc's grids (calibrate{method=mse},quantize), no GPTQ, bias correction: the baseline;
- `per-channel, any scales`: one mse range per channel everywhere, int8 weights unchanged. Not buildable as is: a
  conv over channels with different scales needs the scales in its weights, and folding them into per-output-
  channel int8 weights costs their precision (`per-channel, folded`, also measured);
- `per-channel, 2^k scales (G)`: channel scales s0 * 2^k, k in 0..G-1, each channel the smallest at or above its own,
  weights unchanged. Buildable exactly: a conv becomes G u8 x s8 convs over the channel groups, summed in int32
  with shifts (the same MACs), an add rescales per channel;
- `... residual stream only`: the same for the values adds read or write only.

Every variant is bias-corrected on the calibration crops (bias-correct). Writes bench/results/channel_grids.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _quantizers(q) -> list:
    """The activation quantize nodes of a QDQ graph on rank-4 values, with their value name."""
    return [n for n in q.nodes if n.op == "quantize" and not q.is_param(n.inputs[0]) and
            q.type_of(n.inputs[0]).rank == 4]


def channel_ranges(f, values: list[str], calibration: np.ndarray, batch: int) -> dict[str, tuple]:
    """Per-channel mse ranges (calibrate's observers) of the float graph's `values` on the calibration inputs."""
    from slimc.data import from_arrays
    from slimc.passes.quant.calibrate import run_observers
    from slimc.passes.quant.observers import make_channel_observer

    observers = {v: make_channel_observer("mse") for v in values}
    run_observers(f, from_arrays([calibration]), observers, batch, len(calibration))
    return {v: o.channel_ranges() for v, o in observers.items()}


def _pow2(scales: np.ndarray, groups: int) -> np.ndarray:
    """Each scale raised to the smallest s0 * 2^k (k < groups) at or above it, s0 = max / 2^(groups - 1)."""
    s0 = scales.max() / 2.0 ** (groups - 1)
    k = np.clip(np.ceil(np.log2(np.maximum(scales, 1e-30) / s0) - 1e-9), 0, groups - 1)
    return s0 * 2.0 ** k


def _residual(q, n) -> bool:
    """Whether the value `n` quantizes is written or read by an add."""
    p = q.producer(n.inputs[0])
    readers = [r for d in q.users(n.name) for r in q.users(d.name)]
    return (p is not None and p.op == "add") or any(r.op == "add" for r in readers)


def per_channel(q, f, ranges: dict, groups: int = 0, residual_only: bool = False, fold: bool = False):
    """`q` with per-channel grids on its rank-4 activations (2^k scales when groups > 0; every value, or only those
    of the residual stream), weights left as they are or (`fold`) re-quantized with the input scales in them."""
    from slimc.passes.quant.channel_grid import is_depthwise
    from slimc.passes.quant.scheme import activation_qparams, weight_qparams

    w = dict(q.weights)
    input_scales: dict[str, np.ndarray] = {}  # dequantize name -> per-channel scale of what it dequantizes
    for n in _quantizers(q):
        v = n.inputs[0]
        if v not in ranges or (residual_only and not _residual(q, n)):
            continue
        whole = activation_qparams(*q.calibration[v]) if v in q.calibration else (np.float32(1), 0)
        qp = [activation_qparams(lo, hi) if hi > lo else whole for lo, hi in ranges[v]]
        scale = np.array([s for s, _ in qp], np.float64)
        if groups:
            scale = _pow2(scale, groups)
            qp = [activation_qparams(min(lo, 0.0), min(lo, 0.0) + 255 * s) for (lo, _), s in zip(ranges[v], scale)]
            scale = np.array([s for s, _ in qp], np.float64)
        w[n.inputs[1]] = scale.astype(np.float32)
        w[n.inputs[2]] = np.array([z for _, z in qp], np.uint8)
        input_scales.update((d.name, scale) for d in q.users(n.name) if d.op == "dequantize")
    nodes = []
    for n in q.nodes:
        if fold and n.op == "conv2d" and n.inputs[0] in input_scales and not is_depthwise(q, n) \
                and n.attrs["groups"] == 1:
            s_in = input_scales[n.inputs[0]][None, :, None, None]
            wf = f.weight(f.node(n.name).inputs[1]).astype(np.float64) * s_in
            wq, ws = weight_qparams(wf.astype(np.float32), 127, True, None)
            name = f"{n.inputs[1]}.folded"
            w[name] = (wq.astype(np.float64) * ws.reshape(-1, 1, 1, 1) / s_in).astype(np.float32)
            n = n.replace(inputs=(n.inputs[0], name, *n.inputs[2:]))
        nodes.append(n)
    return q.with_nodes(nodes, w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobilenet_v2,efficientnet_lite0")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--groups", default="2,4,8", help="numbers of 2^k scale groups to try (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "channel_grids.json"))
    args = p.parse_args(argv)

    import torch

    from slimc import data, evalset, interpreter, zoo
    from slimc.frontend.torch import from_torch
    from slimc.pass_manager import PassContext, PassInput, PassManager

    rows = []
    for name in args.models.split(","):
        module = getattr(zoo, name)()
        split = evalset.for_model(module, args.n_calib, args.n_eval, args.seed)
        calib, ev = split.calibration.arrays[0], split.evaluation.arrays[0]
        f = from_torch(module, (torch.from_numpy(calib[:1]),), dynamic_batch=True, name=name)
        f, _ = PassManager("canonicalize,fold-bn,fuse-act").run(f)
        with torch.no_grad():
            ref = np.concatenate([module(torch.from_numpy(ev[s:s + 32])).numpy() for s in range(0, len(ev), 32)])
        ctx = PassContext(calib=data.from_arrays([calib], name="calibration"),
                          log=lambda m: print(m, file=sys.stderr, flush=True))
        fc, _ = PassManager("calibrate{method=mse}", context=ctx).run(f)
        q, _ = PassManager("quantize", context=ctx).run(fc)
        correct = PassManager("bias-correct", context=dataclasses.replace(ctx, inputs_of={"quantize": PassInput(fc)}))
        t0 = time.perf_counter()
        ranges = channel_ranges(f, [n.inputs[0] for n in _quantizers(q)], calib, 32)
        print(f"{name}: per-channel ranges of {len(ranges)} values in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        variants = {"per-tensor": q, "per-channel, any scales": per_channel(q, f, ranges),
                    "per-channel, any scales, folded": per_channel(q, f, ranges, fold=True)}
        for g in (int(x) for x in args.groups.split(",")):
            variants[f"per-channel, 2^k scales ({g})"] = per_channel(q, f, ranges, groups=g)
        best = max(int(x) for x in args.groups.split(","))
        variants[f"per-channel, 2^k scales ({best}), residual stream only"] = \
            per_channel(q, f, ranges, groups=best, residual_only=True)
        for label, graph in variants.items():
            graph = correct.run(graph)[0]
            out = np.concatenate([interpreter.run(graph, [ev[s:s + 32]])[0] for s in range(0, len(ev), 32)])
            row = {"model": name, "grids": label,
                   "agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                   "sqnr_db": float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - out) ** 2).sum()))}
            rows.append(row)
            print(f"{name:20s} {label:55s} {100 * row['agreement']:6.2f} %  {row['sqnr_db']:5.1f} dB", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"n_calib": args.n_calib, "n_eval": args.n_eval, "seed": args.seed, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
