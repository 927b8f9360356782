"""Per-channel activation grids at depthwise-conv inputs: calibration, quantize's choice, fold-qdq, IR, backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from slimc import data, interpreter, ir
from slimc.errors import IRError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassContext, PassManager
from slimc.passes.quant.channel_grid import grid_activation
from slimc.passes.quant.fallback import float_fallback
from slimc.rewrite import Edit, rename_values
from test_quant_calibrate import assert_same_ranges
from test_quant_pipeline import sqnr, values


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def graph(samples) -> ir.Graph:
    g = from_torch(tiny_models.dw_net(), (torch.from_numpy(samples[:2]),), name="dwnet", dynamic_batch=True)
    return PassManager("canonicalize,fold-bn,fuse-act").run(g)[0]


def run(g: ir.Graph, pipeline: str, x: np.ndarray):
    """(graph, stats of each pass by name) after `pipeline` with `x` as calibration data."""
    out, records = PassManager(pipeline, context=PassContext(calib=data.from_arrays([x]))).run(g)
    return out, {r.name.split("{")[0]: r.pass_stats for r in records}


def dw_inputs(g: ir.Graph) -> dict[str, str]:
    """{depthwise conv name: the value it reads} of a float graph."""
    return {n.name: n.inputs[0] for n in g.nodes if n.op == "conv2d" and n.attrs["groups"] > 1}


def grid_of(q: ir.Graph, v: str) -> str:
    """'channel' or 'tensor': the grid of the quantize node reading float value `v` in QDQ graph `q`."""
    (qn,) = [u for u in q.users(v) if u.op == "quantize"]
    return "channel" if q.type_of(qn.inputs[1]).rank == 1 else "tensor"


@pytest.fixture(scope="module")
def minmax(graph, samples) -> ir.Graph:
    return run(graph, "calibrate{method=minmax,cache=false}", samples)[0]


def expected_grids(graph: ir.Graph) -> tuple[list[str], list[str]]:
    """(values read by dw1 and dw2: per-channel, values read by dw3 and dw4: per-tensor) of DWNet."""
    reads = list(dw_inputs(graph).values())
    assert len(reads) == 4
    return reads[:2], reads[2:]


# ---- calibration --------------------------------------------------------------------------------

def test_channel_ranges_are_the_per_channel_extremes_of_depthwise_inputs(graph, minmax, samples):
    per_channel, _ = expected_grids(graph)
    after_add = list(dw_inputs(graph).values())[2]  # only dw3 reads it: calibrated per channel, quantize decides
    assert set(minmax.channel_calibration) == {*per_channel, after_add}
    seen = values(graph, samples)
    for v, ranges in minmax.channel_calibration.items():
        t = seen[v]
        lo, hi = t.amin(dim=(0, 2, 3)).double().numpy(), t.amax(dim=(0, 2, 3)).double().numpy()
        assert ranges == tuple((min(a, 0.0), max(b, 0.0)) for a, b in zip(lo.tolist(), hi.tolist())), v
        assert minmax.calibration[v] == (min(r[0] for r in ranges), max(r[1] for r in ranges))
    widths = [hi for _, hi in minmax.channel_calibration[per_channel[0]]]
    assert max(widths) > 5 * np.median(widths)  # why per-channel grids help: one channel dominates the tensor
    off, stats = run(graph, "calibrate{method=minmax,cache=false,channels=false}", samples)
    assert off.channel_calibration == {} and off.calibration == minmax.calibration and stats["calibrate"][
        "channel_values"] == 0


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_channel_ranges_do_not_depend_on_the_batch_size(graph, samples, method):
    one, _ = run(graph, f"calibrate{{method={method},batch_size=1,cache=false}}", samples)
    five, _ = run(graph, f"calibrate{{method={method},batch_size=5,cache=false}}", samples)
    eight, _ = run(graph, f"calibrate{{method={method},batch_size=8,cache=false}}", samples)
    for a in (one, five):
        assert set(a.channel_calibration) == set(eight.channel_calibration)
        for v in eight.channel_calibration:
            flat = lambda g: {f"{c}": r for c, r in enumerate(g.channel_calibration[v])}  # noqa: E731
            assert_same_ranges(flat(a), flat(eight))


def test_mse_channel_ranges_clip_inside_the_extremes(graph, minmax, samples):
    mse, _ = run(graph, "calibrate{method=mse,cache=false}", samples)
    assert set(mse.channel_calibration) == set(minmax.channel_calibration)
    for v, ranges in mse.channel_calibration.items():
        for (lo, hi), (mlo, mhi) in zip(ranges, minmax.channel_calibration[v]):
            assert mlo <= lo <= 0.0 <= hi <= mhi
        assert ranges != minmax.channel_calibration[v]


def test_cache_keeps_channel_ranges(graph, samples):
    first, s1 = run(graph, "calibrate{method=mse}", samples)
    second, s2 = run(graph, "calibrate{method=mse}", samples)
    assert (s1["calibrate"]["cache"], s2["calibrate"]["cache"]) == ("miss", "hit")
    assert second.channel_calibration == first.channel_calibration and second == first
    assert run(graph, "calibrate{method=mse,channels=false}", samples)[1]["calibrate"]["cache"] == "miss"


# ---- IR ------------------------------------------------------------------------------------------

def test_channel_ranges_round_trip_through_text_and_file(minmax, tmp_path):
    text = ir.print_graph(minmax)
    assert text.count(" channels [[") == len(minmax.channel_calibration) == 3
    back = ir.parse_graph(text)
    assert back == minmax and back.channel_calibration == minmax.channel_calibration  # repr floats: bit-exact
    ir.save(minmax, tmp_path / "g.slimc")
    assert ir.load(tmp_path / "g.slimc").channel_calibration == minmax.channel_calibration
    with pytest.raises(IRError, match="channels"):
        ir.parse_graph(text.replace(" channels [[", " channels [[1.0, ", 1))


def test_channel_ranges_follow_their_value(minmax):
    v = next(iter(minmax.channel_calibration))
    ranges = minmax.channel_calibration[v]
    with pytest.raises(IRError, match="per-channel ranges"):
        minmax.replace(channel_calibration={v: ranges[:-1]}).verify()
    with pytest.raises(IRError, match="no calibrated range"):
        dict_without = {k: r for k, r in minmax.calibration.items() if k != v}
        ir.Graph(minmax.name, minmax.inputs, minmax.outputs, minmax.nodes, minmax.param_types, minmax.weights,
                 dict_without, {v: ranges}).verify()
    # a new whole-tensor range drops the old channel ranges; an unchanged one keeps them
    moved = minmax.replace(calibration={**minmax.calibration, v: (0.0, 1.0)})
    assert v not in moved.channel_calibration and len(moved.channel_calibration) == 2
    assert minmax.replace(calibration=dict(minmax.calibration)).channel_calibration == minmax.channel_calibration
    # rewriting the producer drops them (its output may change); renaming carries them
    e = Edit(minmax)
    p = minmax.producer(v)
    e.replace_node(p.name, p.replace(attrs={**p.attrs, "act": "relu"}))
    assert v not in e.apply().channel_calibration
    assert p.name == v  # conv2d with its relu6 fused
    assert rename_values(minmax, {v: "renamed"}).channel_calibration["renamed"] == ranges
    assert minmax.with_nodes(minmax.nodes).channel_calibration == minmax.channel_calibration


# ---- quantize and fold-qdq ----------------------------------------------------------------------

def test_grid_activation_keeps_bounds_scalar():
    top = (0, 255)
    fine = np.array([6.0 / 255, 0.001], np.float32)  # calibrated maxima <= 6: the u8 top applies relu6's bound
    assert grid_activation({"act": "relu6"}, fine, 0, top) == {"act": "relu"}
    assert grid_activation({"act": "relu6"}, np.array([7.0 / 255], np.float32), 0, top) is None
    assert grid_activation({"act": "clip", "clip_min": -1.0, "clip_max": None}, fine, 0, top) == {"act": "none"}
    assert grid_activation({"act": "clip", "clip_min": -1.0, "clip_max": None}, fine, 128, top) is None
    assert grid_activation({"act": "none"}, fine, 3, top) == {"act": "none"}
    assert grid_activation({"act": "hardswish"}, fine, 0, top) is None


def test_quantize_gives_per_channel_grids_to_depthwise_inputs_only(graph, minmax):
    per_channel, per_tensor = expected_grids(graph)
    q, stats = run(minmax, "quantize", np.zeros((1, 3, 32, 32), np.float32))
    assert stats["quantize"]["channel_grids"] == 2
    assert [grid_of(q, v) for v in per_channel] == ["channel", "channel"]
    assert [grid_of(q, v) for v in per_tensor] == ["tensor", "tensor"]  # after an add; also read by a 1x1 and an add
    assert sum(q.type_of(n.inputs[1]).rank == 1 for n in q.nodes if n.op == "quantize") == 2
    off, stats = run(minmax, "quantize{dw_channel_grid=false}", np.zeros((1, 3, 32, 32), np.float32))
    assert stats["quantize"]["channel_grids"] == 0 and all(grid_of(off, v) == "tensor" for v in per_channel)
    # a channel whose range passes relu6's bound would need a per-channel clip: that tensor stays per-tensor
    v = per_channel[0]
    wide = [*minmax.channel_calibration[v]]
    wide[0] = (0.0, 7.0)
    hot = minmax.replace(calibration={**minmax.calibration, v: (0.0, 7.0)},
                         channel_calibration={**minmax.channel_calibration, v: tuple(wide)})
    q, stats = run(hot, "quantize", np.zeros((1, 3, 32, 32), np.float32))
    assert stats["quantize"]["channel_grids"] == 1 and grid_of(q, v) == "tensor"


def test_depthwise_input_also_read_by_an_add_stays_per_tensor(samples):
    x = samples
    g = from_torch(tiny_models.quant_net(), (torch.from_numpy(x[:2]),), name="qnet", dynamic_batch=True)
    g = PassManager("canonicalize,fold-bn,fuse-act").run(g)[0]
    _, stats = run(g, "calibrate{method=minmax,cache=false},quantize", x)
    assert stats["calibrate"]["channel_values"] == 0 and stats["quantize"]["channel_grids"] == 0


def test_fold_makes_integer_layers_matching_the_qdq_graph(graph, minmax, samples):
    q, _ = run(minmax, "quantize", samples)
    f, stats = run(q, "fold-qdq", samples)
    tensor_only, off = run(run(minmax, "quantize{dw_channel_grid=false}", samples)[0], "fold-qdq", samples)
    assert stats["fold-qdq"]["folded"] == off["fold-qdq"]["folded"]
    assert stats["fold-qdq"]["quantize_left"] == off["fold-qdq"]["quantize_left"]  # per-channel grids all folded
    assert stats["fold-qdq"]["dequantize_left"] == 0 and stats["fold-qdq"]["int8_mac_share"] == 1.0
    per_channel, _ = expected_grids(graph)
    for v in per_channel:
        (qn,) = [u for u in q.users(v) if u.op == "quantize"]
        producer = f.node(qn.name)  # the layer took the quantize's name and its grid
        assert producer.op == "qconv2d" and producer.attrs["act"] == "relu"  # relu6's bound: the u8 top
        assert producer.attrs["out_scale"] == 1.0 and producer.attrs["x_zero_point"] >= 0
        (dw,) = f.users(qn.name)
        assert dw.op == "qconv2d" and dw.attrs["groups"] == f.type_of(qn.name).shape[1]
    # integer values equal the QDQ graph's up to the int32 bias rounding, where the inputs are the same integers
    qv, fv = values(q, samples), values(f, samples)
    stem = q.users(q.inputs[0][0])[0].name  # the input's quantize: identical in both
    first = [n.name for n in f.nodes if n.op == "qconv2d"][:2]  # stem -> per-channel grid -> dw1
    assert (fv[stem].int() == qv[stem].int()).all()
    for v in first:
        diff = (fv[v].int() - qv[v].int()).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, v
    ref = interpreter.run(q, [samples])[0]
    assert sqnr(ref, interpreter.run(f, [samples])[0]) > 40
    assert sqnr(interpreter.run(graph, [samples])[0], interpreter.run(f, [samples])[0]) > 25
    assert sqnr(interpreter.run(graph, [samples])[0], interpreter.run(tensor_only, [samples])[0]) > 25


def test_recovery_passes_work_with_channel_grids(graph, samples):
    ctx = PassContext(calib=data.from_arrays([samples]))
    q, records = PassManager("calibrate{method=mse,cache=false},quantize,bias-correct,"
                             "quant-fallback{sqnr_floor=200,max_layers=3}", context=ctx).run(graph)
    stats = {r.name.split("{")[0]: r.pass_stats for r in records}
    assert stats["quantize"]["channel_grids"] == 2 and len(stats["quant-fallback"]["fallback"]) == 3
    f, _ = run(q, "fold-qdq", samples)
    assert sqnr(interpreter.run(q, [samples])[0], interpreter.run(f, [samples])[0]) > 40


def with_float_stem(graph: ir.Graph, minmax: ir.Graph, samples: np.ndarray) -> tuple[ir.Graph, ir.Graph]:
    """(QDQ graph, folded graph) with the stem back in float: its output keeps a per-channel quantize node."""
    q, _ = run(minmax, "quantize", samples)
    per_channel, _ = expected_grids(graph)
    fq = float_fallback(q, minmax, [graph.producer(per_channel[0]).name])
    return fq, run(fq, "fold-qdq", samples)[0]


def test_float_producer_keeps_a_per_channel_quantize_node(graph, minmax, samples):
    fq, f = with_float_stem(graph, minmax, samples)
    (qn,) = [n for n in f.nodes if n.op == "quantize" and f.type_of(n.inputs[1]).rank == 1]
    assert f.node(qn.inputs[0]).op == "conv2d" and f.users(qn.name)[0].op == "qconv2d"
    assert sqnr(interpreter.run(fq, [samples])[0], interpreter.run(f, [samples])[0]) > 40


# ---- backend -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def static(samples) -> tuple[ir.Graph, ir.Graph]:
    """(float graph, min-max calibrated graph) of DWNet with a fixed batch of 2: the backend needs static shapes."""
    g = from_torch(tiny_models.dw_net(), (torch.from_numpy(samples[:2]),), name="dwnet")
    g = PassManager("canonicalize,fold-bn,fuse-act").run(g)[0]
    return g, run(g, "calibrate{method=minmax,cache=false}", samples)[0]


def _run_built(executable, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _assert_build_is_bit_exact(f: ir.Graph, x: np.ndarray, target: str) -> None:
    from slimc.targets.build import build
    from slimc.targets.triple import resolve

    r = build(f, resolve(target), trials=0, progress=False)
    np.testing.assert_array_equal(_run_built(r.executable, x), interpreter.run(f, [x])[0])


@pytest.mark.backend
@pytest.mark.parametrize("target", ["native", "x86-avx2"])
def test_built_module_is_bit_exact(static, samples, target):
    q, stats = run(static[1], "quantize", samples[:2])
    f, _ = run(q, "fold-qdq", samples[:2])
    assert stats["quantize"]["channel_grids"] == 2
    _assert_build_is_bit_exact(f, samples[:2], target)


@pytest.mark.backend
def test_built_module_with_a_standalone_per_channel_quantize_is_bit_exact(static, samples):
    _, f = with_float_stem(*static, samples[:2])
    assert any(n.op == "quantize" and f.type_of(n.inputs[1]).rank == 1 for n in f.nodes)
    _assert_build_is_bit_exact(f, samples[:2], "native")


@pytest.mark.backend
def test_aarch64_dotprod_lowering_is_bit_exact_on_the_host(static, samples):
    """lower_arm's s8 shift, zero-point bias and packed layouts with per-channel grids (the sdot conv unscheduled)."""
    import tvm
    from tvm import relax

    from slimc.targets.lower import Lowerer, default_plan
    from slimc.targets.triple import resolve
    from slimc.targets.tune import prepare

    q, _ = run(static[1], "quantize", samples[:2])
    f, _ = run(q, "fold-qdq", samples[:2])
    arm, host = resolve("aarch64-linux-gnu", None, "+neon,+dotprod"), resolve("native")
    mod = prepare(Lowerer(f, host.tvm(), default_plan(arm), arm).run(), host.tvm())
    vm = relax.VirtualMachine(tvm.compile(mod, host.tvm()), tvm.cpu())
    x = samples[:2]
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), interpreter.run(f, [x])[0])


def test_channel_observer_sees_each_channel_of_every_sample():
    from slimc.passes.quant.observers import make_channel_observer

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 4, 4)) * np.array([0.1, 1.0, 10.0])[None, :, None, None]
    obs = make_channel_observer("minmax")
    obs.update(x[:4])
    obs.update(x[4:])
    assert obs.range() == (float(x.min()), float(x.max()))
    assert obs.channel_ranges() == tuple((float(x[:, c].min()), float(x[:, c].max())) for c in range(3))
    with pytest.raises(ValueError, match="channel count"):
        obs.update(x[:, :2])
