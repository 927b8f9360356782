"""calibrate: run the graph over calibration data and record every float activation's range in `Graph.calibration`.

The quantize pass reads `graph.calibration[value] -> (lo, hi)` (lo <= 0 <= hi). Ranges come from an observer per
value (`observers.METHODS`) fed through the interpreter's hook; they do not depend on the batch size, so the
on-disk cache is keyed by the graph, the data's fingerprint, the method options and the number of samples only.
Values only depthwise convs read (`channel_grid.channel_values`) also get one range per channel, by the same
method, in `graph.channel_calibration` (quantize's per-channel grids).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from slimc import ir
from slimc.errors import PipelineError
from slimc.ir import Graph
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.quant.channel_grid import channel_values
from slimc.passes.quant.observers import METHODS, ChannelObserver, Observer, make_channel_observer, make_observer
from slimc.passes.quant.qdq import fixed_batch

#: bump when an observer's algorithm changes, so that cached ranges computed the old way are not reused
CACHE_FORMAT = 2
PROGRESS_EVERY_S = 2.0


def calib_cache_dir() -> str:
    """Where cached calibration ranges live: `calib` under slimc's cache root (slimc.cache)."""
    from slimc.cache import cache_dir

    return cache_dir("calib")


def observed_values(g: Graph) -> list[str]:
    """The float activations to calibrate: graph inputs and node outputs (never parameters), in graph order."""
    def is_float(t: ir.TensorType) -> bool:
        return np.issubdtype(np.dtype(t.dtype), np.floating)

    values = [v for v, t in g.inputs if is_float(t)]
    values += [o for n in g.nodes for o, t in zip(n.outputs, n.out_types) if is_float(t)]
    return values


def calibrated_range(g: Graph, value: str) -> tuple[float, float]:
    """The calibrated (lo, hi) of `value`, or a PipelineError saying to run calibrate first."""
    try:
        return g.calibration[value]
    except KeyError:
        raise PipelineError(f"value %{value} of graph {g.name} has no calibrated range: run the calibrate pass "
                            "(with --calib DATA) after the passes that change values and before quantize") from None


def graph_digest(g: Graph) -> str:
    """Content hash of what calibration depends on: the IR text (calibration aside) and the weight bytes."""
    h = hashlib.sha256(ir.print_graph(g.replace(calibration={})).encode())
    for name in sorted(g.weights):
        a = np.ascontiguousarray(g.weights[name])
        h.update(f"\0{name}:{a.dtype}{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _method_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a method's result depends on (others do not split the cache)."""
    method = options["method"]
    out: dict[str, Any] = {"method": method}
    if method == "percentile":
        out["percentile"] = float(options["percentile"])
    if method == "moving_average":
        out["momentum"] = float(options["momentum"])
    return out


def cache_key(g: Graph, data_fingerprint: str, method_options: Mapping[str, Any], samples: int,
              channels: bool = True) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "graph": graph_digest(g), "data": data_fingerprint,
                       "options": dict(method_options), "samples": samples, "channels": channels}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


Ranges = dict[str, tuple[float, float]]
ChannelRanges = dict[str, tuple[tuple[float, float], ...]]


def _valid(r: Sequence[float]) -> bool:
    return len(r) == 2 and math.isfinite(r[0]) and math.isfinite(r[1]) and r[0] <= 0.0 <= r[1]


def _read_cache(path: str, key: str, values: Sequence[str], per_channel: Sequence[str],
                log) -> tuple[Ranges, ChannelRanges] | None:
    """Cached ranges (whole-tensor, per-channel), or None when absent; an unreadable or inconsistent file is
    reported and ignored."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != CACHE_FORMAT or doc.get("key") != key:
            raise ValueError("it was written for another graph, data or format")
        ranges = {v: (float(r[0]), float(r[1])) for v, r in doc["ranges"].items() if len(r) == 2}
        if set(ranges) != set(values) or not all(_valid(r) for r in ranges.values()):
            raise ValueError("its ranges do not match the graph's activations")
        channels = {v: tuple((float(lo), float(hi)) for lo, hi in rs) for v, rs in doc["channel_ranges"].items()}
        if set(channels) != set(per_channel) or not all(_valid(r) for rs in channels.values() for r in rs):
            raise ValueError("its per-channel ranges do not match the graph's depthwise inputs")
        return ranges, channels
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        msg = f"ignoring corrupt calibration cache file {path} ({e}); recomputing the ranges"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log(f"warning: {msg}")
        return None


def _write_cache(path: str, doc: Mapping[str, Any], log) -> None:
    """Write to a temp file in the cache dir and rename it into place; a failure only costs the next run time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log(f"warning: could not write calibration cache {path}: {e.strerror or e}; set SLIMC_CACHE_DIR to a "
            "writable directory to reuse ranges across runs")


def _chunks(data: Any, size: int, limit: int) -> Iterator[tuple[np.ndarray, ...]]:
    """The first `limit` samples in batches of exactly `size` (the last may be smaller), however the source batches."""
    pending: list[tuple[np.ndarray, ...]] = []
    have = seen = 0
    for b in data.batches(size):
        arrays = tuple(np.asarray(a) for a in b.inputs)
        n = min(int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 0, limit - seen)
        if n <= 0:
            if seen >= limit:
                break
            continue
        pending.append(tuple(a[:n] for a in arrays))
        have += n
        seen += n
        while have >= size:
            merged = tuple(np.concatenate([p[i] for p in pending]) for i in range(len(pending[0])))
            yield tuple(a[:size] for a in merged)
            rest = tuple(a[size:] for a in merged)
            have -= size
            pending = [rest] if have else []
        if seen >= limit:
            break
    if have:
        yield tuple(np.concatenate([p[i] for p in pending]) for i in range(len(pending[0])))


def run_observers(g: Graph, data: Any, observers: Mapping[str, Observer], batch_size: int, samples: int,
                  log=lambda msg: None) -> tuple[int, int]:
    """Feed the first `samples` samples of `data` through the graph into `observers` (by value name); returns
    (batches, samples) run. Graph inputs are observed as given, node outputs through the interpreter's hook.
    """
    import torch

    from slimc import interpreter

    module = interpreter.GraphModule(g)
    dtypes = [getattr(torch, t.dtype) for _, t in g.inputs]
    total = math.ceil(samples / batch_size)
    t0 = last = time.perf_counter()
    done = seen = 0

    def hook(node: ir.Node, outs: tuple[torch.Tensor, ...]) -> None:
        for v, t in zip(node.outputs, outs):
            obs = observers.get(v)
            if obs is not None:
                obs.update(t.detach().cpu().numpy())

    for arrays in _chunks(data, batch_size, samples):
        if done == 0:
            interpreter.check_inputs(g, arrays)
        tensors = [torch.as_tensor(np.ascontiguousarray(a)).to(dt) for a, dt in zip(arrays, dtypes)]
        for (v, _), t in zip(g.inputs, tensors):
            if v in observers:
                observers[v].update(t.numpy())
        with torch.no_grad():
            module(*tensors, hook=hook)
        done += 1
        seen += int(arrays[0].shape[0])
        now = time.perf_counter()
        if done == total or now - last >= PROGRESS_EVERY_S:
            eta = (now - t0) / done * (total - done)
            log(f"calibrate: {done}/{total} batches, {now - t0:.1f}s, ETA {eta:.0f}s")
            last = now
    return done, seen


@register_pass(
    "calibrate",
    method=opt(str, "minmax", f"range estimator: {'|'.join(METHODS)}"),
    percentile=opt(float, 99.99, "percentile method: keep values between the (100-p)-th and p-th percentiles"),
    momentum=opt(float, 0.01, "moving_average method: per-sample averaging constant"),
    batches=opt(int, 0, "use the first batches*batch_size samples (0: all)"),
    batch_size=opt(int, 8, "samples per interpreter run (ranges do not depend on it)"),
    cache=opt(bool, True, "reuse/store ranges under $SLIMC_CACHE_DIR/calib (default ~/.cache/slimc/calib)"),
    channels=opt(bool, True, "also per-channel ranges of values only depthwise convs read (for dw_channel_grid)"),
)
def calibrate(graph: Graph, ctx: PassContext) -> PassResult:
    """Record each float activation's (lo, hi) from calibration data so that quantize can choose u8 grids."""
    o = ctx.options
    method, batches, batch_size = o.get("method", "minmax"), o.get("batches", 0), o.get("batch_size", 8)
    if method not in METHODS:
        raise PipelineError(f"calibrate: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 50.0 < o.get("percentile", 99.99) <= 100.0:
        raise PipelineError(f"calibrate: percentile={o['percentile']} is outside (50, 100]; e.g. 99.99 keeps all "
                            "but the top and bottom 0.01% of values")
    if not 0.0 < o.get("momentum", 0.01) <= 1.0:
        raise PipelineError(f"calibrate: momentum={o['momentum']} is outside (0, 1]")
    if batches < 0 or batch_size <= 0:
        raise PipelineError(f"calibrate: batches={batches} and batch_size={batch_size} must be >= 0 and > 0")
    data = ctx.calibration_data
    if data is None:
        raise PipelineError("calibrate needs calibration data to run the model on: pass --calib SPEC (an .npy/.npz "
                            "file, a folder of images, or package.module:callable; --data is used if --calib is "
                            "not given), or PassContext(calib=slimc.data.from_arrays([...])) from Python")
    method_options = _method_options({"method": method, "percentile": o.get("percentile", 99.99),
                                      "momentum": o.get("momentum", 0.01)})

    fixed = fixed_batch(graph)
    run_bs = fixed or batch_size
    available = len(data)
    samples = min(available, batches * batch_size) if batches else available
    if fixed:
        if fixed != batch_size:
            ctx.log(f"calibrate: the graph fixes its batch size to {fixed}; running batches of {fixed}")
        samples -= samples % fixed
    if samples <= 0:
        raise PipelineError(f"calibrate: the calibration data has {available} sample(s), "
                            + (f"fewer than the batch size {fixed} the graph fixes; give at least {fixed}, or "
                               "re-import the model with a symbolic batch (--dynamic-batch)" if fixed else
                               "so there is nothing to calibrate on; give at least one sample"))

    values = observed_values(graph)
    channels = o.get("channels", True)
    observed = set(values)
    per_channel = [v for v in channel_values(graph) if v in observed] if channels else []
    stats: dict[str, Any] = {**method_options, "values": len(values), "channel_values": len(per_channel),
                             "samples": samples, "batches": 0, "cache": "off", "cache_file": None}
    cached: tuple[Ranges, ChannelRanges] | None = None
    path = None
    if o.get("cache", True):
        key = cache_key(graph, data.fingerprint(), method_options, samples, channels)
        path = os.path.join(calib_cache_dir(), f"{key}.json")
        stats["cache_file"] = path
        cached = _read_cache(path, key, values, per_channel, ctx.log)
        stats["cache"] = "hit" if cached is not None else "miss"
        if cached is not None:
            ctx.log(f"calibrate: {len(values)} ranges from the cache ({path})")
    if cached is None:
        opts = {"percentile": method_options.get("percentile", 99.99), "momentum": method_options.get("momentum", 0.01)}
        observers: dict[str, Observer] = {v: make_observer(method, **opts) for v in values}
        observers.update((v, make_channel_observer(method, **opts)) for v in per_channel)
        stats["batches"], seen = run_observers(graph, data, observers, run_bs, samples, ctx.log)
        if seen != samples:
            raise PipelineError(f"calibrate: the calibration data says it has {available} samples but yielded "
                                f"{seen} of the {samples} asked for; check the data source")
        cached = ({v: obs.range() for v, obs in observers.items()},
                  {v: obs.channel_ranges() for v, obs in observers.items() if isinstance(obs, ChannelObserver)})
        if path is not None:
            _write_cache(path, {"format": CACHE_FORMAT, "key": key, "graph": graph.name, **method_options,
                                "samples": samples, "ranges": {v: list(r) for v, r in cached[0].items()},
                                "channel_ranges": {v: [list(r) for r in rs] for v, rs in cached[1].items()}}, ctx.log)
    out = graph.replace(calibration=cached[0], channel_calibration=cached[1])
    changed = out.calibration != graph.calibration or out.channel_calibration != graph.channel_calibration
    return PassResult(out, changed, stats)
