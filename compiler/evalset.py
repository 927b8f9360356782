"""Natural-image crops for int8 work: a calibration set and a disjoint evaluation set cut from the zoo's photos.

The crops are the standard ImageNet training augmentation (random resized crop: 8–100 % of the photo's area,
aspect 3/4–4/3, then a horizontal flip half the time) with a fixed seed, so every quantizer (slimc's, ONNX
Runtime's) calibrates and is judged on the same arrays. Crop geometry does not depend on the preprocessing:
two models with different input scales see the same pixels. Crop i only depends on the seed and i, so a
smaller set is a prefix of a larger one; the first `n_calib` crops calibrate, the rest evaluate.

There are only 13 source photos, so calibration and evaluation crops are disjoint arrays of the same scenes;
the set measures quantization fidelity against fp32 (no labels), not accuracy. Training crops (`training`, for
quantization-aware fine-tuning) are cut from 7 other photos (`slimc.zoo.training_photos`), so what is judged on the
evaluation crops was never trained on their scenes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimc.data import ArrayDataset
from slimc.errors import SlimcError

SEED = 0
N_CALIB = 128
N_EVAL = 512
N_TRAIN = 1024
SCALE = (0.08, 1.0)  # fraction of the photo's area (torchvision RandomResizedCrop defaults)
RATIO = (3 / 4, 4 / 3)  # width / height
PREPROCESS = ("imagenet", "lite")  # slimc.zoo.normalize's input scales


class EvalSetError(SlimcError):
    """The crop set was asked for with impossible parameters."""


@dataclass(frozen=True)
class CropBox:
    """Where one crop comes from: photo index, box in that photo's pixels, and whether it is mirrored."""

    photo: int
    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class EvalSplit:
    """Calibration crops (the first `n_calib`) and evaluation crops (the next `n_eval`), same seed and scale."""

    calibration: ArrayDataset
    evaluation: ArrayDataset
    size: int
    preprocess: str
    seed: int


def _random_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 10 tries at a random area and aspect, else the clamped centre crop."""
    area = h * w
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < RATIO[0]:
        cw, ch = w, int(round(w / RATIO[0]))
    elif in_ratio > RATIO[1]:
        ch, cw = h, int(round(h * RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop_boxes(n: int, shapes: Sequence[tuple[int, int]], seed: int = SEED) -> list[CropBox]:
    """n crop boxes over photos of the given (height, width), photos taken in turn so every scene is covered."""
    if n < 0:
        raise EvalSetError(f"number of crops must be >= 0, got {n}")
    if not shapes:
        raise EvalSetError("no photos to crop from (slimc.zoo.photos() returned none; is scikit-image installed?)")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = i % len(shapes)
        top, left, ch, cw = _random_box(rng, *shapes[p])
        out.append(CropBox(p, top, left, ch, cw, bool(rng.random() < 0.5)))
    return out


def crops_rgb(n: int, size: int = 224, seed: int = SEED, training: bool = False) -> np.ndarray:
    """n crops as NHWC RGB float32 in [0, 1], resized (bilinear, antialiased) to size x size; of the training
    photos (other scenes) if `training`."""
    import torch
    import torch.nn.functional as F

    from slimc.zoo import photos, training_photos

    if size <= 0:
        raise EvalSetError(f"crop size must be positive, got {size}")
    pics = training_photos() if training else photos()
    boxes = crop_boxes(n, [p.shape[:2] for p in pics], seed)
    out = np.empty((n, size, size, 3), np.float32)
    for i, b in enumerate(boxes):
        patch = pics[b.photo][b.top:b.top + b.height, b.left:b.left + b.width]
        t = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))[None]
        r = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if b.flip:
            r = r.flip(-1)
        out[i] = r.permute(1, 2, 0).clamp_(0.0, 1.0).numpy()
    return out


def crops(n: int, size: int = 224, preprocess: str = "imagenet", seed: int = SEED,
          training: bool = False) -> np.ndarray:
    """n crops as NCHW float32 network inputs, scaled per `preprocess` ("imagenet" or "lite", see slimc.zoo)."""
    from slimc.zoo import normalize

    if preprocess not in PREPROCESS:
        raise EvalSetError(f"unknown preprocessing {preprocess!r}; slimc.zoo.normalize knows {', '.join(PREPROCESS)}")
    return np.ascontiguousarray(normalize(crops_rgb(n, size, seed, training), preprocess).transpose(0, 3, 1, 2))


def training(n: int = N_TRAIN, size: int = 224, preprocess: str = "imagenet", seed: int = SEED) -> ArrayDataset:
    """n crops of the training photos (scenes disjoint from the calibration/evaluation photos), for fine-tuning."""
    x = crops(n, size, preprocess, seed, training=True)
    return ArrayDataset((x,), name=f"train-crops{size}-{preprocess}-seed{seed}[0:{n}]")


def split(n_calib: int = N_CALIB, n_eval: int = N_EVAL, *, size: int = 224, preprocess: str = "imagenet",
          seed: int = SEED) -> EvalSplit:
    """The first n_calib crops for calibration, the next n_eval (disjoint) for evaluation."""
    if n_calib < 1 or n_eval < 1:
        raise EvalSetError(f"both parts of the split need at least one crop, got n_calib={n_calib}, n_eval={n_eval}")
    x = crops(n_calib + n_eval, size, preprocess, seed)
    tag = f"crops{size}-{preprocess}-seed{seed}"
    return EvalSplit(ArrayDataset((x[:n_calib],), name=f"{tag}-calib[0:{n_calib}]"),
                     ArrayDataset((x[n_calib:],), name=f"{tag}-eval[{n_calib}:{n_calib + n_eval}]"),
                     size, preprocess, seed)


def for_model(model, n_calib: int = N_CALIB, n_eval: int = N_EVAL, seed: int = SEED) -> EvalSplit:
    """The split at a zoo model's input size and preprocessing (its `slimc_input_shape` / `slimc_preprocess`)."""
    preprocess = getattr(model, "slimc_preprocess", None)
    shape = getattr(model, "slimc_input_shape", None)
    if preprocess is None or shape is None or len(shape) != 4 or shape[2] != shape[3]:
        raise EvalSetError(f"{type(model).__name__} does not declare an image input (slimc_input_shape N,3,S,S and "
                           "slimc_preprocess, as slimc.zoo models do); call evalset.split(size=..., preprocess=...)")
    return split(n_calib, n_eval, size=int(shape[2]), preprocess=preprocess, seed=seed)


def imagenet_calibration() -> ArrayDataset:
    """Calibration crops with ImageNet mean/std preprocessing (`--calib slimc.evalset:imagenet_calibration`)."""
    return split(n_eval=1).calibration


def lite_calibration() -> ArrayDataset:
    """Calibration crops with EfficientNet-Lite's (x-127)/128 preprocessing (`--calib slimc.evalset:lite_calibration`)."""
    return split(n_eval=1, preprocess="lite").calibration


def imagenet_evaluation() -> ArrayDataset:
    """Evaluation crops (disjoint from calibration) with ImageNet preprocessing, for `slimc compile --eval`."""
    return split(n_eval=N_EVAL).evaluation


def lite_evaluation() -> ArrayDataset:
    """Evaluation crops (disjoint from calibration) with EfficientNet-Lite preprocessing, for `slimc compile --eval`."""
    return split(n_eval=N_EVAL, preprocess="lite").evaluation


def imagenet_training() -> ArrayDataset:
    """Training crops (other scenes) with ImageNet preprocessing (`--data slimc.evalset:imagenet_training`)."""
    return training()


def lite_training() -> ArrayDataset:
    """Training crops (other scenes) with EfficientNet-Lite preprocessing (`--data slimc.evalset:lite_training`)."""
    return training(preprocess="lite")
