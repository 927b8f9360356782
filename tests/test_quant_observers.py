"""Calibration observers: known answers on synthetic data, batch-size independence, bounded streaming memory."""

from __future__ import annotations

import numpy as np
import pytest

from slimc.passes.quant import observers as O


def feed(obs, x: np.ndarray, batch: int):
    """Stream `x` (batch first) into `obs` in batches of `batch` samples; return its range."""
    for s in range(0, len(x), batch):
        obs.update(x[s:s + batch])
    return obs.range()


def u8_error(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of u8 asymmetric quantize-dequantize of x with the range [lo, hi] (ONNX rounding)."""
    x = x.astype(np.float64)
    scale = (hi - lo) / 255
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def drifting(seed: int = 0) -> np.ndarray:
    """64 samples whose spread and offset grow from sample to sample: the histogram range must keep growing."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 3, 7)) * np.geomspace(0.01, 50, 64)[:, None, None]
    x += np.linspace(-2, 5, 64)[:, None, None]
    x[40, 1, 2] = 400.0  # an outlier late in the stream
    return x.astype(np.float32)


def test_minmax_is_exact():
    x = drifting()
    assert feed(O.MinMaxObserver(), x, 5) == (float(x.min()), float(x.max()))
    pos = np.abs(x) + 1.0
    assert feed(O.MinMaxObserver(), pos, 5) == (0.0, float(pos.max()))  # widened to contain 0


@pytest.mark.parametrize("method", O.METHODS)
def test_every_range_contains_zero_and_stays_inside_the_data(method):
    rng = np.random.default_rng(3)
    for x in (rng.uniform(1, 2, (16, 50)), rng.uniform(-2, -1, (16, 50)), rng.laplace(size=(16, 50))):
        x = x.astype(np.float32)
        lo, hi = feed(O.make_observer(method), x, 4)
        assert min(float(x.min()), 0.0) <= lo <= 0.0 <= hi <= max(float(x.max()), 0.0)
        assert hi - lo > 0


def test_moving_average_is_a_per_sample_average():
    x = drifting()
    mins, maxs = x.reshape(64, -1).min(1).astype(np.float64), x.reshape(64, -1).max(1).astype(np.float64)
    # momentum 1/64: a plain mean over the 64 samples
    lo, hi = feed(O.MovingAverageObserver(momentum=1 / 64), x, 7)
    assert lo == pytest.approx(min(mins.mean(), 0), abs=1e-12) and hi == pytest.approx(maxs.mean(), abs=1e-12)
    # momentum 0.25: the mean of the first 4 samples, then an exponential average
    ref_lo, ref_hi = mins[:4].mean(), maxs[:4].mean()
    for a, b in zip(mins[4:], maxs[4:]):
        ref_lo, ref_hi = ref_lo + 0.25 * (a - ref_lo), ref_hi + 0.25 * (b - ref_hi)
    lo, hi = feed(O.MovingAverageObserver(momentum=0.25), x, 3)
    assert lo == pytest.approx(min(ref_lo, 0), abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(p):
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(60_000), rng.standard_t(3, 60_000) * 2 + 1]).astype(np.float32)
    rng.shuffle(x)
    obs = O.PercentileObserver(p)
    lo, hi = feed(obs, x.reshape(-1, 100), 50)
    width = obs.hist.width
    assert width < (x.max() - x.min()) / 1000  # at least ~2000 cells over the range
    assert lo == pytest.approx(np.percentile(x, 100 - p), abs=2 * width)
    assert hi == pytest.approx(np.percentile(x, p), abs=2 * width)


def test_entropy_clips_heavy_tails_and_keeps_bounded_data():
    rng = np.random.default_rng(5)
    t = rng.standard_t(2, 200_000).astype(np.float32)
    # unsigned (post-ReLU-like): [0, T] with T well below the maximum but above the bulk of the values
    lo, hi = feed(O.EntropyObserver(), np.abs(t).reshape(-1, 1000), 20)
    assert lo == 0.0 and np.percentile(np.abs(t), 99.9) < hi < 0.5 * np.abs(t).max()
    # signed: a symmetric [-T, T] inside the data, tighter than min-max on both sides
    lo, hi = feed(O.EntropyObserver(), t.reshape(-1, 1000), 20)
    assert lo == -hi and t.min() < lo < 0 < hi < t.max()
    # nothing to clip on a uniform distribution: the range is (almost) the whole support
    u = rng.uniform(0, 1, 100_000).astype(np.float32)
    lo, hi = feed(O.EntropyObserver(), u.reshape(-1, 100), 100)
    assert lo == 0.0 and hi > 0.98


def test_entropy_ignores_the_spike_of_relu_zeros():
    rng = np.random.default_rng(6)
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)  # half the values are exactly 0
    lo, hi = feed(O.EntropyObserver(), x.reshape(-1, 100), 100)
    assert lo == 0.0 and np.percentile(x, 99.9) < hi <= x.max()


def test_entropy_does_not_collapse_mass_far_from_zero():
    # KL is blind to how far clipping moves values: on few samples peaked away from 0 (like pooled features),
    # clipping all of them into the first occupied cell scores best; here that cell is at 0.28, the max 1.08
    x = np.abs(np.random.default_rng(2).normal(0.65, 0.15, 256)).astype(np.float32)
    lo, hi = feed(O.EntropyObserver(), x.reshape(-1, 16), 4)
    assert lo == 0.0 and np.percentile(x, 99.9) <= hi <= x.max()


def test_mse_has_lower_quantization_error_than_minmax_on_laplace():
    x = np.random.default_rng(7).laplace(size=100_000).astype(np.float32)
    mm = feed(O.MinMaxObserver(), x.reshape(-1, 100), 100)
    mse = feed(O.MSEObserver(), x.reshape(-1, 100), 100)
    assert mm[0] < mse[0] < 0 < mse[1] < mm[1]
    assert u8_error(x, *mse) < 0.95 * u8_error(x, *mm)
    # and it beats the percentile ranges near it too (it is a search, not a rule of thumb)
    assert u8_error(x, *mse) <= u8_error(x, *feed(O.PercentileObserver(99.99), x.reshape(-1, 100), 100))


@pytest.mark.parametrize("method", O.METHODS)
def test_ranges_do_not_depend_on_the_batch_size(method):
    x = drifting()
    ref = feed(O.make_observer(method), x, 1)
    for batch in (2, 3, 8, 64):
        assert feed(O.make_observer(method), x, batch) == ref, f"batch {batch}"


def test_histogram_is_exact_and_bounded_however_values_arrive():
    rng = np.random.default_rng(8)
    chunks = [rng.standard_normal(1000) * 10.0 ** rng.uniform(-3, 6) + rng.uniform(-100, 100) for _ in range(300)]
    streamed = O.StreamingHistogram()
    for c in chunks:
        streamed.update(c.astype(np.float32))
        assert streamed.counts.shape == (4096,) and streamed.counts.dtype == np.int64
    allx = np.concatenate(chunks).astype(np.float32)
    once = O.StreamingHistogram()
    once.update(allx)
    assert (streamed.k, streamed.offset, streamed.count) == (once.k, once.offset, allx.size)
    np.testing.assert_array_equal(streamed.counts, once.counts)
    # the counts are those of a one-shot histogram on the same grid
    edges = (streamed.offset + np.arange(4097)) * streamed.width
    np.testing.assert_array_equal(streamed.counts, np.histogram(allx.astype(np.float64), edges)[0])
    # the grid is as fine as the range allows: the data does not fit in half as many cells
    assert (allx.max() - allx.min()) / streamed.width > 4096 / 2 - 2


def test_non_finite_values_and_empty_observers():
    x = drifting()
    dirty = x.copy()
    dirty[3, 0, 0], dirty[5, 1, 1], dirty[9, 2, 2] = np.nan, np.inf, -np.inf
    for method in O.METHODS:
        assert O.make_observer(method).range() == (0.0, 0.0)
        if method == "moving_average":
            continue  # per-sample minima move when a sample loses a value
        clean = O.make_observer(method)
        clean.update(dirty[np.isfinite(dirty)])
        assert feed(O.make_observer(method), dirty, 8) == clean.range(), method
    assert np.isfinite(feed(O.MovingAverageObserver(), dirty, 8)).all()
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        O.make_observer("kl")
    with pytest.raises(ValueError, match="percentile"):
        O.PercentileObserver(40)
