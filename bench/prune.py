"""Pruning bench: an MNIST CNN pruned to 50 % of its MACs by slimc and by Torch-Pruning, accuracy before and after
recovery, in one run and one table.

    .venv/bin/python bench/prune.py [--target 0.5] [--epochs 8] [--lr 3e-3] [--alpha 0.5]

The model and data come from bench/mnist.py (4000 training / 1000 test digits, fixed split and seed, trained weights
cached under ~/.cache/slimc/bench/). Writes bench/results/prune.json.

What is compared, and why it is fair:
- Same criterion: L2 magnitude of the coupled weights (conv/dense rows and input slices, not BN), reduced by the
  mean over a group's members with mean normalization, ranked globally, at most 90 % of one group removed, no
  channel rounding. slimc: `prune{criterion=l2,scope=global,round_to=1}`; Torch-Pruning: `MetaPruner` with
  `GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean", target_types=[Conv2d, Linear])`,
  `global_pruning=True`, `max_pruning_ratio=0.9`, the head ignored. (Torch-Pruning sums squared weights per member
  and normalizes once per group; slimc takes each member's L2 norm and normalizes per member.)
- Same MAC target: each tool's ratio is found by bisection so that the pruned model has at most `--target` of the
  original MACs, as close as it gets; MACs are counted for both the same way (slimc's graph statistics on the
  imported graph: conv and dense multiply-accumulates per sample).
- Same fine-tuning budget: the same epochs, optimizer, learning rate, cosine schedule with warm-up, batch size and
  sample order (slimc.data.iter_batches with the same seeds) on the same 4000 training digits, for every row.
  Torch-Pruning is fine-tuned twice: with slimc's recovery on its pruned model (bn-reestimate, then distill from the
  unpruned model with the same loss), which isolates the choice of channels; and with Torch-Pruning's own recipe,
  plain PyTorch fine-tuning in train mode (batch-norm statistics follow the batches) with cross-entropy to the
  labels.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mnist import TrainConfig, accuracy, torch_predict, trained_model  # noqa: E402


def ir_predict(graph):
    from slimc import interpreter

    return lambda x: interpreter.run(graph, [x])[0]


def ratio_for_macs(macs_at, target: int, lo: float = 0.0, hi: float = 0.95, iters: int = 14, scan: int = 40):
    """The ratio whose pruned model has the most MACs not above `target`, with that model (macs_at: r -> (macs, m)).

    MACs fall with the ratio in steps (and not strictly: channel counts are rounded per group), so a bisection finds
    the region and a fine scan below its upper end picks the closest model under the budget.
    """
    for _ in range(iters):
        mid = (lo + hi) / 2
        if macs_at(mid)[0] <= target:
            hi = mid
        else:
            lo = mid
    best = None
    for r in np.linspace(max(0.0, hi - 0.04), hi, scan + 1):
        macs, m = macs_at(float(r))
        if macs <= target and (best is None or macs > best[1]):
            best = (float(r), macs, m)
    if best is None:
        raise SystemExit(f"cannot reach {target} MACs even at ratio {hi}")
    return best


# ---- slimc -----------------------------------------------------------------------------------------------

def slimc_prune(graph, ratio: float):
    from slimc.pass_manager import PassManager
    from slimc.stats import graph_stats

    out, _ = PassManager(f"prune{{ratio={ratio!r},criterion=l2,scope=global,round_to=1}}").run(graph)
    return graph_stats(out).macs, out


def recover(pruned, reference, data, ft: dict, log) -> tuple:
    """slimc's recovery: bn-reestimate, then distill from `reference`; returns both graphs."""
    from slimc.pass_manager import PassContext, PassManager

    ctx = PassContext(data=data, reference=reference, log=log)
    bn, _ = PassManager("bn-reestimate{batch_size=250}", context=ctx).run(pruned)
    opts = ",".join(f"{k}={v}" for k, v in ft.items())
    distilled, _ = PassManager(f"distill{{{opts},progress=false}}", context=ctx).run(bn)
    return bn, distilled


# ---- Torch-Pruning ---------------------------------------------------------------------------------------

def tp_prune(model: torch.nn.Module, ratio: float, example: torch.Tensor) -> torch.nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean",
                                                 target_types=[torch.nn.Conv2d, torch.nn.Linear])
    pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                  max_pruning_ratio=0.9, ignored_layers=[m.fc], round_to=None)
    pruner.step()
    return m


def torch_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """conv2d + linear multiply-accumulates per sample, counted as slimc's graph statistics count them."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            total += out[0].numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total += mod.in_features * mod.out_features
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(example[:1])
    for h in handles:
        h.remove()
    return total


def finetune_train_mode(model: torch.nn.Module, data, ft: dict, log) -> torch.nn.Module:
    """Torch-Pruning's recipe: plain PyTorch fine-tuning in train mode with cross-entropy, on slimc's schedule."""
    from slimc.data import iter_batches
    from slimc.passes.distill import lr_factor, make_optimizer

    m = copy.deepcopy(model)
    opt = make_optimizer(m.parameters(), ft["optimizer"], ft["lr"], 0.0)
    total = ft["epochs"] * math.ceil(len(data) / ft["batch_size"])
    warm = int(round(ft["warmup"] * total))
    step = 0
    for epoch in range(ft["epochs"]):
        m.train()
        losses = []
        for b in iter_batches(data, ft["batch_size"], seed=ft["seed"] + epoch):
            for g in opt.param_groups:
                g["lr"] = ft["lr"] * lr_factor(step, total, warm)
            loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(b.inputs[0])), torch.from_numpy(b.labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
        log(f"torch-pruning fine-tune: epoch {epoch + 1}/{ft['epochs']} loss {np.mean(losses):.4f}")
    return m.eval()


# ---- the run ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=0.5, help="MAC budget as a fraction of the original (0.5)")
    ap.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs for every row (8)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3, Adam)")
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--alpha", type=float, default=0.5, help="distillation: weight of the KL term vs cross-entropy (0.5)")
    ap.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (4)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prune.json"))
    args = ap.parse_args()

    import torch_pruning as tp

    import slimc
    from slimc.data import from_arrays
    from slimc.frontend.torch import from_torch
    from slimc.pass_manager import PassManager
    from slimc.stats import graph_stats

    t_start = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    cfg = TrainConfig()
    model, split = trained_model(cfg, log)
    example = torch.from_numpy(split.x_train[:2])
    data = from_arrays([split.x_train], split.y_train, name="mnist-train")
    test = (split.x_test, split.y_test)
    ft = {"epochs": args.epochs, "lr": args.lr, "optimizer": args.optimizer, "batch_size": 64,
          "temperature": args.temperature, "alpha": args.alpha, "warmup": 0.05, "seed": 0}

    fp32 = accuracy(torch_predict(model), *test)
    graph, _ = PassManager("canonicalize").run(from_torch(model, (example,), dynamic_batch=True, name="mnist_cnn"))
    fp32_ir = accuracy(ir_predict(graph), *test)
    base = graph_stats(graph)
    target = int(args.target * base.macs)
    log(f"fp32: {fp32:.2%} (IR {fp32_ir:.2%}), {base.macs / 1e6:.2f} M MACs; target {target / 1e6:.2f} M MACs")
    rows = []

    def row(name, macs, params, ratio, pruned, bn, tuned, seconds):
        r = {"method": name, "ratio": round(ratio, 4), "macs": macs, "macs_frac": macs / base.macs, "params": params,
             "acc_pruned": pruned, "acc_bn_reestimate": bn, "acc_finetuned": tuned, "delta_vs_fp32": tuned - fp32,
             "seconds": round(seconds, 1)}
        rows.append(r)
        log(f"{name}: {macs / base.macs:.1%} MACs, pruned {pruned:.2%}, bn {'-' if bn is None else f'{bn:.2%}'}, "
            f"fine-tuned {tuned:.2%}")

    # slimc: prune -> bn-reestimate -> distill
    t0 = time.perf_counter()
    ratio, macs, pruned = ratio_for_macs(lambda r: slimc_prune(graph, r), target)
    bn, distilled = recover(pruned, graph, data, ft, log)
    row("slimc: prune + bn-reestimate + distill", macs, graph_stats(pruned).params, ratio,
        accuracy(ir_predict(pruned), *test), accuracy(ir_predict(bn), *test), accuracy(ir_predict(distilled), *test),
        time.perf_counter() - t0)

    # Torch-Pruning, same MAC target
    t0 = time.perf_counter()
    tp_ratio, _, tp_model = ratio_for_macs(lambda r: (lambda m: (torch_macs(m, example), m))(tp_prune(model, r, example)),
                                         target)
    tp_graph, _ = PassManager("canonicalize").run(from_torch(tp_model, (example,), dynamic_batch=True, name="tp"))
    tp_stats = graph_stats(tp_graph)
    if tp_stats.macs != torch_macs(tp_model, example):
        raise SystemExit(f"MAC counts disagree: slimc {tp_stats.macs}, hook count {torch_macs(tp_model, example)}")
    tp_pruned_acc = accuracy(torch_predict(tp_model), *test)
    t_prune = time.perf_counter() - t0
    tp_bn, tp_distilled = recover(tp_graph, graph, data, ft, log)
    row("Torch-Pruning + slimc recovery (bn-reestimate + distill)", tp_stats.macs, tp_stats.params, tp_ratio,
        tp_pruned_acc, accuracy(ir_predict(tp_bn), *test), accuracy(ir_predict(tp_distilled), *test),
        time.perf_counter() - t0)
    t0 = time.perf_counter()
    tp_tuned = finetune_train_mode(tp_model, data, ft, log)
    row("Torch-Pruning + its own fine-tune (train mode, cross-entropy)", tp_stats.macs, tp_stats.params, tp_ratio,
        tp_pruned_acc, None, accuracy(torch_predict(tp_tuned), *test), t_prune + time.perf_counter() - t0)

    from slimc.report import table

    body = [[r["method"], f"{r['macs'] / 1e6:.2f} M ({r['macs_frac']:.1%})", f"{r['params'] / 1e3:.1f} k",
             f"{r['acc_pruned']:.2%}", "-" if r["acc_bn_reestimate"] is None else f"{r['acc_bn_reestimate']:.2%}",
             f"{r['acc_finetuned']:.2%}", f"{100 * r['delta_vs_fp32']:+.2f} pt"] for r in rows]
    head = [["fp32 (unpruned)", f"{base.macs / 1e6:.2f} M (100%)", f"{base.params / 1e3:.1f} k", "-", "-",
             f"{fp32:.2%}", "-"]]
    print(f"MNIST CNN ({cfg.n_train} train / {cfg.n_test} test digits), pruned to <= {args.target:.0%} of the MACs; "
          f"fine-tune: {ft['epochs']} epochs {ft['optimizer']} lr {ft['lr']} cosine (KD T={ft['temperature']}, "
          f"alpha={ft['alpha']})")
    print(table(["method", "MACs", "params", "acc. pruned", "+BN re-est.", "+fine-tune", "vs fp32"], head + body,
                [False, True, True, True, True, True, True]))
    s, best_tp = rows[0], max(r["acc_finetuned"] for r in rows[1:])
    verdict = {"slimc_within_0.5pt_of_fp32": bool(round((fp32 - s["acc_finetuned"]) * len(test[1])) <= 0.005 * len(test[1])),
               "slimc_at_least_torch_pruning": bool(s["acc_finetuned"] >= best_tp)}
    print(", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict.items()))
    result = {"model": cfg.arch, "train_config": cfg.__dict__, "fp32_accuracy": fp32, "fp32_ir_accuracy": fp32_ir,
              "macs": base.macs, "params": base.params, "target_frac": args.target, "target_macs": target,
              "finetune": ft, "rows": rows, "acceptance": verdict, "threads": torch.get_num_threads(),
              "versions": {"slimc": getattr(slimc, "__version__", "0.1.0"), "torch": torch.__version__,
                           "torch_pruning": tp.__version__},
              "seconds": round(time.perf_counter() - t_start, 1)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
