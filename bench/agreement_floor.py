"""What logit SQNR does a given top-1 agreement take on slimc's evaluation crops?

Any quantized model's logits are the float logits plus an error; how much agreement an error of a given size costs
depends on the crops' top-1 margins. This bench takes the fp32 PyTorch logits of the same 512 evaluation crops
bench/fidelity.py judges (slimc.evalset, seed 0), adds Gaussian noise scaled per crop to a target SQNR (fidelity's
per-crop definition, 10·log10(Σref² / Σnoise²)), and measures the agreement over several noise draws. Quantization
error is not white noise, so the curve is a yardstick, not a prediction: compare it with the measured rows of the
fidelity table (agreement at their median SQNR). Writes bench/results/agreement_floor.json.

    .venv/bin/python bench/agreement_floor.py [--models mobilenet_v2,efficientnet_lite0] [--draws 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SQNRS_DB = (15.0, 17.5, 20.0, 22.5, 25.0, 27.5, 30.0, 32.5, 35.0, 37.5, 40.0, 45.0, 50.0)


def noisy_agreement(ref: np.ndarray, sqnr_db: float, draws: int, rng: np.random.Generator) -> float:
    """Mean top-1 agreement of ref + noise with ref, the noise white and scaled so each crop has exactly sqnr_db."""
    top = ref.argmax(axis=1)
    power = (ref.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
    hits = 0
    for _ in range(draws):
        e = rng.standard_normal(ref.shape)
        e *= np.sqrt(power * 10 ** (-sqnr_db / 10) / (e ** 2).sum(axis=1, keepdims=True))
        hits += int(((ref + e).argmax(axis=1) == top).sum())
    return hits / (draws * len(ref))


def margins(ref: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of each crop, over the crop's logit RMS (what a relative error has to overcome)."""
    part = np.sort(ref, axis=1)
    return (part[:, -1] - part[:, -2]) / np.sqrt((ref ** 2).mean(axis=1))


def main() -> int:
    from fidelity import torch_logits

    from slimc import evalset, zoo
    from slimc.report import table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2,efficientnet_lite0", help="slimc.zoo models (comma-separated)")
    p.add_argument("--n-eval", type=int, default=evalset.N_EVAL, help="evaluation crops (after the calibration ones)")
    p.add_argument("--draws", type=int, default=20, help="noise draws per SQNR")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default=os.path.join(HERE, "results", "agreement_floor.json"))
    args = p.parse_args()

    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        module = getattr(zoo, name)()
        split = evalset.for_model(module, n_eval=args.n_eval)
        ref = torch_logits(module, split.evaluation.arrays[0]).astype(np.float64)
        rng = np.random.default_rng(args.seed)
        curve = [{"sqnr_db": s, "top1_agreement": noisy_agreement(ref, s, args.draws, rng)} for s in SQNRS_DB]
        m = margins(ref)
        results.append({"model": name, "crops": len(ref), "evaluation": split.evaluation.name, "curve": curve,
                        "relative_margin_quantiles": {q: float(np.quantile(m, q)) for q in (0.01, 0.02, 0.05, 0.1)}})
        print(f"{name}: {len(ref)} crops; top-1 margin over logit RMS, 2nd / 5th / 10th percentile: "
              f"{np.quantile(m, 0.02):.3f} / {np.quantile(m, 0.05):.3f} / {np.quantile(m, 0.1):.3f}", file=sys.stderr)

    print(table(["logit SQNR", *[r["model"] for r in results]],
                [[f"{s:.1f} dB", *[f"{100 * r['curve'][i]['top1_agreement']:.1f} %" for r in results]]
                 for i, s in enumerate(SQNRS_DB)], right=[True] * (1 + len(results))))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"draws": args.draws, "seed": args.seed, "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
