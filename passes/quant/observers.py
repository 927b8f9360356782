"""Calibration observers: streaming estimates of an activation's range for u8 asymmetric quantization.

Each observer takes tensors through `update(x)` (batch first, any number of calls) and answers `range()`, a
`(lo, hi)` that contains 0 so that the u8 grid holds 0 exactly. No observer keeps the values it saw, and none
depends on how the samples were split into batches: min-max is exact; the moving average runs over samples,
not batches; the histogram observers share `StreamingHistogram`, whose final counts depend only on the values.
`ChannelObserver` runs one observer per channel (axis 1) next to the whole-tensor one, with CHANNEL_BINS-cell
histograms so that memory stays channels x 8 KiB.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")

#: quantization levels of the u8 activation grid
LEVELS = 256
#: the finest cell a histogram uses is 2**-REL_RESOLUTION times the largest magnitude seen
REL_RESOLUTION = 40
#: cell exponent when only zeros were seen (any later non-zero value coarsens it)
K_MIN = -200
#: histogram cells of a whole-tensor observer, and of each channel's (per-channel ranges: memory is channels x this)
BINS = 4096
CHANNEL_BINS = 1024


def _finite(x: Any) -> np.ndarray:
    """The finite values of `x`, flattened (NaN/inf carry no range information and would poison one)."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    a = a.reshape(-1)
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        a = a[np.isfinite(a)]
    return a


def with_zero(lo: float, hi: float) -> tuple[float, float]:
    """The range widened to contain 0, as Python floats (u8 asymmetric quantization represents 0 exactly)."""
    return min(float(lo), 0.0), max(float(hi), 0.0)


def u8_fake_quant_error(values: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        qmax: int = LEVELS - 1) -> np.ndarray:
    """Sum of squared u8 quantize-dequantize errors of weighted `values` for each candidate range (lo[i], hi[i]).

    The grid is the quantize pass's: scale (hi - lo) / qmax, zero point round(-lo / scale) clipped to [0, qmax].
    """
    lo, hi = np.asarray(lo, np.float64)[:, None], np.asarray(hi, np.float64)[:, None]
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0)
    zp = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(values[None, :] / scale) + zp, 0, qmax)
    return (((q - zp) * scale - values[None, :]) ** 2) @ counts


class Observer(ABC):
    """Streaming range estimator: `update(tensor)` any number of times, then `range()`."""

    @abstractmethod
    def update(self, x: Any) -> None:
        """Account for the values of one tensor (batch first); NaN and inf are ignored."""

    @abstractmethod
    def range(self) -> tuple[float, float]:
        """The calibrated (lo, hi), lo <= 0 <= hi; (0.0, 0.0) if no finite value was seen."""


class MinMaxObserver(Observer):
    """The exact smallest and largest value seen."""

    def __init__(self) -> None:
        self.lo, self.hi, self.count = math.inf, -math.inf, 0

    def update(self, x: Any) -> None:
        a = _finite(x)
        if a.size:
            self.lo, self.hi = min(self.lo, float(a.min())), max(self.hi, float(a.max()))
            self.count += a.size

    def range(self) -> tuple[float, float]:
        return with_zero(self.lo, self.hi) if self.count else (0.0, 0.0)


class MovingAverageObserver(Observer):
    """Exponential moving average of each sample's min and max (rows along axis 0), so batching cannot matter.

    Sample t moves the averages by max(momentum, 1/t): a plain mean over the first 1/momentum samples (no
    start-up bias towards the first sample), an exponential average after that.
    """

    def __init__(self, momentum: float = 0.01) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"moving-average momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.lo = self.hi = 0.0
        self.samples = 0

    def update(self, x: Any) -> None:
        a = np.asarray(x)
        rows = a.reshape(a.shape[0] if a.ndim else 1, -1)
        if rows.shape[0] == 0 or rows.shape[1] == 0:
            return
        if np.isfinite(rows.min()) and np.isfinite(rows.max()):
            mins, maxs = rows.min(axis=1), rows.max(axis=1)
        else:
            clean = np.where(np.isfinite(rows), rows, np.nan)
            keep = ~np.isnan(clean).all(axis=1)
            mins, maxs = np.nanmin(clean[keep], axis=1), np.nanmax(clean[keep], axis=1)
        for lo, hi in zip(mins.tolist(), maxs.tolist()):
            self.samples += 1
            c = max(self.momentum, 1.0 / self.samples)
            self.lo += c * (lo - self.lo)
            self.hi += c * (hi - self.hi)

    def range(self) -> tuple[float, float]:
        return with_zero(self.lo, self.hi) if self.samples else (0.0, 0.0)


class StreamingHistogram:
    """Counts in `bins` cells of width 2**k on a grid anchored at 0, covering everything seen; memory is fixed.

    When new values widen the range, k grows only as far as needed for the range to fit (cells merge in aligned
    pairs, exactly) and the window slides. The final k is a function of the final min and max alone, and merging
    is exact, so the counts are the same however the values arrived (batch size, order).
    """

    def __init__(self, bins: int = 4096) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.k: int | None = None
        self.offset = 0  # grid index of counts[0]: cell j covers [(offset + j) * 2**k, (offset + j + 1) * 2**k)
        self.lo, self.hi, self.count = math.inf, -math.inf, 0

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.k if self.k is not None else 0)

    def _needed_k(self, lo: float, hi: float) -> int:
        """The smallest cell exponent (>= the current one) at which [lo, hi] fits in `bins` cells."""
        amax = max(abs(lo), abs(hi))
        k = K_MIN if amax == 0 else math.frexp(amax)[1] - 1 - REL_RESOLUTION
        if hi > lo:
            k = max(k, math.floor(math.log2((hi - lo) / self.bins)) - 1)
        if self.k is not None:
            k = max(k, self.k)
        while math.floor(math.ldexp(hi, -k)) - math.floor(math.ldexp(lo, -k)) + 1 > self.bins:
            k += 1
        return k

    def _regrid(self, lo: float, hi: float) -> None:
        k = self._needed_k(lo, hi)
        offset = math.floor(math.ldexp(lo, -k))
        if self.k is not None:
            nz = np.flatnonzero(self.counts)
            d = k - self.k
            q0, r = divmod(self.offset, 1 << d)  # old grid index offset + j lands in cell q0 + (r + j) >> d
            if d <= 30:
                carry = (r + nz) >> d
            else:  # r + j < 2**(d+1): the carry is 0 or 1
                carry = (nz >= min((1 << d) - r, self.bins)).astype(np.int64)
            local = (q0 - offset) + carry
            counts = np.zeros(self.bins, np.int64)
            np.add.at(counts, local, self.counts[nz])
            self.counts = counts
        self.k, self.offset = k, offset

    def update(self, x: Any) -> None:
        a = _finite(x)
        if not a.size:
            return
        lo, hi = min(self.lo, float(a.min())), max(self.hi, float(a.max()))
        if self.k is None or lo < self.lo or hi > self.hi:
            self._regrid(lo, hi)
            self.lo, self.hi = lo, hi
        if a.dtype == np.float32 and -126 <= self.k <= 0:  # scaling up by a power of two is exact in float32
            cells = np.floor(a * np.float32(math.ldexp(1.0, -self.k))).astype(np.int64)
        else:
            cells = np.floor(a.astype(np.float64) * math.ldexp(1.0, -self.k)).astype(np.int64)
        self.counts += np.bincount(cells - self.offset, minlength=self.bins)
        self.count += a.size

    def grid_indices(self) -> np.ndarray:
        """Grid index of every cell (cell i covers [i, i+1) * width)."""
        return self.offset + np.arange(self.bins, dtype=np.int64)

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) as numpy's linear method gives it, within about one cell width.

        Like numpy, interpolates between the two order statistics around rank q*(n-1); each is placed in its
        cell as if the cell's values were spread evenly.
        """
        cum = np.cumsum(self.counts)

        def element(m: int) -> float:
            j = min(int(np.searchsorted(cum, m, side="right")), self.bins - 1)
            inside = (m - float(cum[j] - self.counts[j]) + 0.5) / max(int(self.counts[j]), 1)
            value = (self.offset + j + min(max(inside, 0.0), 1.0)) * self.width
            return min(max(value, self.lo), self.hi)

        rank = min(max(q, 0.0), 1.0) * (self.count - 1)
        below = math.floor(rank)
        v = element(below)
        return v if rank == below else v + (rank - below) * (element(below + 1) - v)

    def magnitudes(self, max_bins: int) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, max|x|] in at most `max_bins` cells (exact merges), and its cell width."""
        g = self.grid_indices()
        folded = np.where(g < 0, -g - 1, g)  # cell [i, i+1)*w with i < 0 holds |x| in (-(i+1), -i]*w
        top = int(folded[self.counts > 0].max())
        m = max(0, top.bit_length() - (max_bins - 1).bit_length())
        mags = np.bincount(folded >> m, weights=self.counts.astype(np.float64), minlength=(top >> m) + 1)
        return mags[: (top >> m) + 1], self.width * 2.0 ** m


class HistogramObserver(Observer):
    """Observers that choose a range from a streaming histogram of everything seen."""

    def __init__(self, bins: int) -> None:
        self.hist = StreamingHistogram(bins)

    def update(self, x: Any) -> None:
        self.hist.update(x)


class PercentileObserver(HistogramObserver):
    """The (100-p)-th and p-th percentiles (two-sided clipping of rare outliers), read off a streaming histogram."""

    def __init__(self, percentile: float = 99.99, bins: int = BINS) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        h = self.hist
        if not h.count:
            return (0.0, 0.0)
        p = self.percentile / 100.0
        return with_zero(h.quantile(1.0 - p), h.quantile(p))


def kl_threshold_bins(hist: np.ndarray, quantized_bins: int, max_clipped: float = 1e-3, eps: float = 1e-4,
                      chunk: int = 64) -> int:
    """TensorRT's entropy calibration: how many leading cells of `hist` to keep so that quantizing them into
    `quantized_bins` levels (outliers clipped into the last kept cell) loses the least information (KL).

    KL does not see how far clipped values move: when most of the mass sits away from 0, clipping it all into one
    cell looks perfect (both distributions become one spike). So thresholds clipping more than `max_clipped` of
    the values are not candidates; on the distributions KL suits (peaked at 0) the optimum clips far less.
    """
    hist = np.asarray(hist, np.float64)
    n, nq = len(hist), quantized_bins
    if n <= nq:
        return n
    S = np.concatenate([[0.0], np.cumsum(hist)])
    NZ = np.concatenate([[0], np.cumsum(hist > 0)])
    J = np.arange(n)
    first = max(nq, int(np.searchsorted(S, S[n] * (1.0 - max_clipped), side="left")))
    best_i, best_kl = n, math.inf
    for c0 in range(first, n + 1, chunk):
        i = np.arange(c0, min(c0 + chunk, n + 1))
        rows = np.arange(len(i))
        valid = J[None, :] < i[:, None]
        tail = S[n] - S[i]  # everything beyond the threshold is clipped into the last kept cell
        p = np.where(valid, hist[None, :], 0.0)
        p[rows, i - 1] += tail
        nz = p > 0
        merged = (i // nq)[:, None]  # cells per quantized level; the last level takes the remainder
        grp = np.minimum(J[None, :] // merged, nq - 1)
        start = np.minimum(grp * merged, n)
        stop = np.minimum(np.where(grp == nq - 1, i[:, None], start + merged), n)
        qsum = S[stop] - S[start]
        norm = (NZ[stop] - NZ[start]) + ((hist[i - 1] == 0) & (tail > 0))[:, None] * (grp == nq - 1)
        q = np.where(nz, qsum / np.maximum(norm, 1), 0.0)
        kl = _kl_rows(p, q, valid, eps)
        k = int(np.argmin(kl))
        if kl[k] < best_kl:
            best_i, best_kl = int(i[k]), float(kl[k])
    return best_i


def _kl_rows(p: np.ndarray, q: np.ndarray, valid: np.ndarray, eps: float) -> np.ndarray:
    """KL(p || q) per row over the valid cells, after TensorRT's smoothing of empty cells."""

    def smooth(h: np.ndarray) -> np.ndarray:
        nz = h > 0
        n_nz = nz.sum(axis=1, keepdims=True)
        n_zero = valid.sum(axis=1, keepdims=True) - n_nz
        eps1 = eps * n_zero / np.maximum(n_nz, 1)
        out = h + eps * (valid & ~nz) - eps1 * nz
        return np.where(valid, np.maximum(out, 1e-12), 0.0)

    ps, qs = smooth(p), smooth(q)
    ps /= ps.sum(axis=1, keepdims=True)
    qs /= qs.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(valid, ps * np.log(ps / qs), 0.0)
    kl = terms.sum(axis=1)
    kl[~(q > 0).any(axis=1)] = math.inf
    return kl


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL calibration on a histogram of |x| (at most 2048 cells).

    An unsigned value (nothing below 0, e.g. after ReLU) gets the range [0, T] with T chosen for the full
    256-level u8 grid, its first cell (ReLU's zeros) counted like its second as pytorch-quantization does; a
    signed value gets [-T, T] (cut to the values seen), 128 levels a side.
    """

    def __init__(self, bins: int = BINS, search_bins: int = 2048) -> None:
        super().__init__(bins)
        self.search_bins = search_bins

    def range(self) -> tuple[float, float]:
        h = self.hist
        if not h.count or h.lo == h.hi:
            return with_zero(h.lo, h.hi) if h.count else (0.0, 0.0)
        mags, width = h.magnitudes(self.search_bins)
        unsigned = h.lo >= 0
        if unsigned and len(mags) > 1:
            mags[0] = mags[1]  # the spike of ReLU zeros is exact in any grid: let it not steer the search
        keep = kl_threshold_bins(mags, LEVELS if unsigned else LEVELS // 2)
        t = keep * width
        if unsigned:
            return with_zero(0.0, min(t, h.hi))
        return with_zero(max(h.lo, -t), min(h.hi, t))


class MSEObserver(HistogramObserver):
    """The range minimizing the u8 quantize-dequantize mean squared error over the histogram (cell centres).

    A search over shrunk min-max ranges [a*lo, a*hi], then (for signed values) alternately over each end alone.
    """

    def __init__(self, bins: int = BINS, candidates: int = 200, qmax: int = LEVELS - 1) -> None:
        super().__init__(bins)
        self.candidates = candidates
        self.qmax = qmax

    def range(self) -> tuple[float, float]:
        h = self.hist
        if not h.count or h.lo == h.hi:
            return with_zero(h.lo, h.hi) if h.count else (0.0, 0.0)
        used = h.counts > 0
        centers = np.clip((h.grid_indices()[used] + 0.5) * h.width, h.lo, h.hi)
        counts = h.counts[used].astype(np.float64)
        lo0, hi0 = with_zero(h.lo, h.hi)
        a = np.arange(1, self.candidates + 1) / self.candidates

        def best(los: np.ndarray, his: np.ndarray) -> tuple[float, float]:
            err = np.concatenate([u8_fake_quant_error(centers, counts, los[s:s + 64], his[s:s + 64], self.qmax)
                                  for s in range(0, len(los), 64)])
            k = int(np.argmin(err))
            return float(los[k]), float(his[k])

        lo, hi = best(a * lo0, a * hi0)
        if lo0 < 0 < hi0:
            for _ in range(2):
                lo, hi = best(np.full_like(a, lo), a * hi0)
                lo, hi = best(a * lo0, np.full_like(a, hi))
        return with_zero(lo, hi)


class ChannelObserver(Observer):
    """A whole-tensor observer plus one per channel (axis 1), each of the same method: per-channel grids need both.

    `range()` is the whole tensor's; `channel_ranges()` one range per channel. Each channel's observer sees that
    channel's values of every sample, so it is as independent of the batching as the method itself.
    """

    def __init__(self, whole: Observer, per_channel: Callable[[], Observer]) -> None:
        self.whole, self.make = whole, per_channel
        self.channels: list[Observer] = []

    def update(self, x: Any) -> None:
        a = np.asarray(x)
        if a.ndim < 2:
            raise ValueError(f"per-channel ranges need a channel axis (axis 1), got a tensor of shape {a.shape}")
        if not self.channels:
            self.channels = [self.make() for _ in range(a.shape[1])]
        elif len(self.channels) != a.shape[1]:
            raise ValueError(f"{a.shape[1]} channels after {len(self.channels)}: the channel count must not change")
        self.whole.update(a)
        for c, obs in enumerate(self.channels):
            obs.update(a[:, c])

    def range(self) -> tuple[float, float]:
        return self.whole.range()

    def channel_ranges(self) -> tuple[tuple[float, float], ...]:
        """One (lo, hi) per channel, lo <= 0 <= hi; () if nothing was seen."""
        return tuple(obs.range() for obs in self.channels)


def make_observer(method: str, *, percentile: float = 99.99, momentum: float = 0.01, bins: int = BINS) -> Observer:
    """A fresh observer for one of METHODS (`bins`: histogram cells of the histogram methods)."""
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageObserver(momentum)
    if method == "percentile":
        return PercentileObserver(percentile, bins)
    if method == "entropy":
        return EntropyObserver(bins)
    if method == "mse":
        return MSEObserver(bins)
    raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def make_channel_observer(method: str, **options: Any) -> ChannelObserver:
    """A ChannelObserver of one of METHODS: a full-size whole-tensor observer, CHANNEL_BINS-cell channel ones."""
    return ChannelObserver(make_observer(method, **options),
                           lambda: make_observer(method, **{**options, "bins": CHANNEL_BINS}))
