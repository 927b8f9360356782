"""calibrate pass on the tiny CNN: ranges vs the real activations, batch-size independence, the on-disk cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import tiny_models
from slimc import data, interpreter, ir
from slimc.errors import PipelineError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassContext, PassManager
from slimc.passes.quant.calibrate import calib_cache_dir, calibrated_range, observed_values


@pytest.fixture(scope="module")
def graph() -> ir.Graph:
    g = from_torch(tiny_models.convnet(), (torch.randn(2, 16, 16, 16),), dynamic_batch=True)
    return PassManager("canonicalize,fold-bn,fuse-act").run(g)[0]


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 16, 16, 16)).astype(np.float32)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "cache" / "calib")


def calibrate(g: ir.Graph, pipeline: str, x: np.ndarray | None, logs: list | None = None):
    """(graph, pass stats) after running `pipeline` with `x` as calibration data."""
    ctx = PassContext(calib=None if x is None else data.from_arrays([x]), log=(logs if logs is not None else []).append)
    out, records = PassManager(pipeline, context=ctx).run(g)
    return out, records[-1].pass_stats


def observed_extremes(g: ir.Graph, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """Exact min and max of every float activation over `x`, straight from the interpreter."""
    seen: dict[str, list[float]] = {"x": [float(x.min()), float(x.max())]}

    def hook(node, outs):
        for v, t in zip(node.outputs, outs):
            if t.is_floating_point():
                lo, hi = seen.setdefault(v, [np.inf, -np.inf])
                seen[v] = [min(lo, float(t.min())), max(hi, float(t.max()))]

    with torch.no_grad():
        interpreter.GraphModule(g)(torch.from_numpy(x), hook=hook)
    return {v: (lo, hi) for v, (lo, hi) in seen.items()}


def assert_same_ranges(a: dict, b: dict) -> None:
    """Equal up to float noise: torch's conv kernels round differently for different batch sizes (ulp level), which
    may move a value into the next histogram cell, so allow one cell of the 2048+ over each range."""
    assert set(a) == set(b)
    for v in a:
        tol = (b[v][1] - b[v][0]) / 2048
        assert a[v] == pytest.approx(b[v], abs=tol), v


def test_minmax_ranges_are_the_observed_activation_extremes(graph, samples):
    out, stats = calibrate(graph, "calibrate{method=minmax,cache=false}", samples)
    out.verify()
    assert graph.calibration == {}  # the pass does not touch its input
    values = observed_values(graph)
    assert set(out.calibration) == set(values) and "x" in values
    assert not any(graph.is_param(v) for v in values)
    for v, (lo, hi) in observed_extremes(graph, samples).items():
        assert out.calibration[v] == (min(lo, 0.0), max(hi, 0.0)), v
    assert out.calibration["conv2d"][0] == 0.0  # post-ReLU
    assert ir.parse_graph(ir.print_graph(out)) == out
    assert stats["values"] == len(values) and stats["samples"] == 16 and stats["batches"] == 2


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "moving_average"])
def test_other_methods_clip_inside_the_observed_range(graph, samples, method):
    out, stats = calibrate(graph, f"calibrate{{method={method},cache=false}}", samples)
    extremes = observed_extremes(graph, samples)
    assert set(out.calibration) == set(extremes)
    for v, (lo, hi) in out.calibration.items():
        assert min(extremes[v][0], 0.0) <= lo <= 0.0 <= hi <= max(extremes[v][1], 0.0), v
        assert hi > lo
    assert stats["method"] == method


def test_ranges_do_not_depend_on_the_batch_size(graph, samples):
    logs: list[str] = []
    one, s1 = calibrate(graph, "calibrate{method=percentile,batch_size=1,cache=false}", samples, logs)
    eight, s8 = calibrate(graph, "calibrate{method=percentile,batch_size=8,cache=false}", samples)
    five, _ = calibrate(graph, "calibrate{method=percentile,batch_size=5,cache=false}", samples)
    assert (s1["batches"], s8["batches"]) == (16, 2)
    assert_same_ranges(one.calibration, eight.calibration)
    assert_same_ranges(five.calibration, eight.calibration)
    assert logs[-1].startswith("calibrate: 16/16 batches") and "ETA" in logs[-1]


def test_batches_option_takes_the_first_samples(graph, samples):
    limited, stats = calibrate(graph, "calibrate{batches=3,batch_size=2,cache=false}", samples)
    prefix, _ = calibrate(graph, "calibrate{cache=false}", samples[:6])
    assert stats["samples"] == 6 and limited.calibration == prefix.calibration
    whole, _ = calibrate(graph, "calibrate{cache=false}", samples)
    assert whole.calibration != limited.calibration


def test_fixed_batch_graph_runs_its_own_batch_size(graph, samples):
    fixed = from_torch(tiny_models.convnet(), (torch.randn(1, 16, 16, 16),))
    fixed = PassManager("canonicalize,fold-bn,fuse-act").run(fixed)[0]
    assert fixed.inputs[0][1].shape[0] == 1
    logs: list[str] = []
    out, stats = calibrate(fixed, "calibrate{batch_size=8,cache=false}", samples, logs)
    assert stats["batches"] == 16 and any("fixes its batch size to 1" in m for m in logs)
    free, _ = calibrate(graph, "calibrate{cache=false}", samples)
    pairs = list(zip(observed_values(fixed), observed_values(graph)))  # same model, a few names differ
    assert len(pairs) == len(free.calibration)
    assert_same_ranges({v: out.calibration[u] for u, v in pairs}, free.calibration)


def test_second_run_hits_the_cache(graph, samples, cache_dir):
    first, s1 = calibrate(graph, "calibrate{method=percentile}", samples)
    assert s1["cache"] == "miss" and s1["batches"] == 2
    assert os.path.dirname(s1["cache_file"]) == cache_dir and os.path.exists(s1["cache_file"])
    logs: list[str] = []
    second, s2 = calibrate(graph, "calibrate{method=percentile,batch_size=4}", samples, logs)
    assert s2["cache"] == "hit" and s2["batches"] == 0 and s2["cache_file"] == s1["cache_file"]
    assert second.calibration == first.calibration and any("from the cache" in m for m in logs)
    # anything the ranges depend on misses: the method, the data, the weights
    assert calibrate(graph, "calibrate{method=minmax}", samples)[1]["cache"] == "miss"
    assert calibrate(graph, "calibrate{method=percentile}", samples[:8])[1]["cache"] == "miss"
    w = dict(graph.weights)
    w["fc.bias"] = w["fc.bias"] + 1.0
    assert calibrate(graph.replace(weights=w), "calibrate{method=percentile}", samples)[1]["cache"] == "miss"
    assert calibrate(graph, "calibrate{method=percentile,cache=false}", samples)[1]["cache"] == "off"
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".json")]) == 4  # no temp files left behind


@pytest.mark.parametrize("damage", ["truncate", "wrong_values"])
def test_corrupt_cache_file_is_ignored_with_a_warning(graph, samples, damage):
    first, s1 = calibrate(graph, "calibrate", samples)
    path = s1["cache_file"]
    if damage == "truncate":
        with open(path, "r+") as f:
            f.truncate(40)
    else:
        with open(path) as f:
            doc = json.load(f)
        doc["ranges"] = {"not_a_value": [0.0, 1.0]}
        with open(path, "w") as f:
            json.dump(doc, f)
    with pytest.warns(RuntimeWarning, match="ignoring corrupt calibration cache file"):
        again, s2 = calibrate(graph, "calibrate", samples)
    assert s2["cache"] == "miss" and s2["batches"] == 2 and again.calibration == first.calibration
    assert calibrate(graph, "calibrate", samples)[1]["cache"] == "hit"  # rewritten


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calib_cache_dir() == str(tmp_path / "own" / "calib")
    monkeypatch.delenv("SLIMC_CACHE_DIR")
    assert calib_cache_dir() == str(tmp_path / "xdg" / "slimc" / "calib")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calib_cache_dir() == str(tmp_path / "home" / ".cache" / "slimc" / "calib")


def test_errors_name_the_fix(graph, samples):
    with pytest.raises(PipelineError, match="calibrate needs calibration data.*--calib"):
        calibrate(graph, "calibrate", None)
    with pytest.raises(PipelineError, match="unknown method 'kl'; choose one of minmax, moving_average"):
        calibrate(graph, "calibrate{method=kl}", samples)
    with pytest.raises(PipelineError, match="percentile=20.0 is outside"):
        calibrate(graph, "calibrate{method=percentile,percentile=20}", samples)
    with pytest.raises(PipelineError, match="run the calibrate pass"):
        calibrated_range(graph, "conv2d")
    out, _ = calibrate(graph, "calibrate{cache=false}", samples)
    assert calibrated_range(out, "conv2d") == out.calibration["conv2d"]
