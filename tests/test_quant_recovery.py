"""int8 recovery after quantize: bias correction, per-layer sensitivity and float fallback, the compile flags."""

import numpy as np
import pytest
import torch

import tiny_models
from slimc import data, interpreter
from slimc.cli import backend_pipeline, main
from slimc.errors import PipelineError, SlimcError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassContext, PassInput, PassManager
from slimc.passes.quant.fallback import float_fallback
from slimc.passes.quant.qdq import int8_nodes

CALIB = "calibrate{method=minmax,cache=false},quantize"


def sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - x).astype(np.float64) ** 2).sum()))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """A user metric for quant-fallback{metric=test_quant_recovery:accuracy}."""
    return float((logits.argmax(-1) == labels).mean())


@pytest.fixture(scope="module")
def setup():
    """QuantNet (every int8 path) with a symbolic batch, 64 calibration and 32 held-out random inputs."""
    x = np.random.default_rng(0).standard_normal((96, 3, 32, 32)).astype(np.float32)
    g = from_torch(tiny_models.quant_net(), (torch.from_numpy(x[:2]),), dynamic_batch=True, name="qnet")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    return g, x[:64], x[64:]


def run(g, pipeline: str, calib: np.ndarray, **ctx):
    """(graph, last pass stats) after `pipeline` with `calib` as calibration data."""
    out, records = PassManager(pipeline, context=PassContext(calib=data.from_arrays([calib]), **ctx)).run(g)
    return out, records[-1].pass_stats


def test_bias_correction_removes_the_mean_output_error(setup):
    g, calib, held_out = setup
    q, _ = run(g, CALIB, calib)
    c, stats = run(g, f"{CALIB},bias-correct", calib)
    assert stats["layers"] == 5 and stats["samples"] == 64 and stats["mean_abs_shift"] > 0
    ref, before, after = (interpreter.run(m, [held_out])[0] for m in (g, q, c))
    mean_before, mean_after = np.abs((before - ref).mean(0)).mean(), np.abs((after - ref).mean(0)).mean()
    assert mean_after < mean_before / 5  # on inputs it was not measured on
    assert sqnr(ref, after) > sqnr(ref, before) + 3
    # only biases moved, and fold-qdq puts the corrected ones into the int32 biases
    assert [n.op for n in c.nodes] == [n.op for n in q.nodes]
    folded, _ = PassManager("fold-qdq").run(c)
    assert {n.op for n in folded.nodes} >= {"qconv2d", "qdense"} and "conv2d" not in {n.op for n in folded.nodes}
    assert sqnr(ref, interpreter.run(folded, [held_out])[0]) > sqnr(ref, before) + 3


def test_recovery_passes_need_quantize_earlier_in_the_pipeline(setup):
    g, calib, _ = setup
    q, _ = run(g, CALIB, calib)
    for p in ("bias-correct", "quant-fallback{sqnr_floor=30}"):
        with pytest.raises(PipelineError, match="after quantize"):
            run(q, p, calib)
    # from Python the float graph can be handed over explicitly
    f, _ = run(g, "calibrate{method=minmax,cache=false}", calib)
    c, stats = run(q, "bias-correct", calib, inputs_of={"quantize": PassInput(f)})
    assert stats["layers"] == 5


def test_float_fallback_of_every_node_is_the_float_model(setup):
    g, calib, held_out = setup
    q, _ = run(g, CALIB, calib)
    names = [n.name for n in int8_nodes(q)]
    assert len(names) == 6  # 4 conv2d, 1 dense, 1 add
    back = float_fallback(q, g, names)
    assert not any(n.op in ("quantize", "dequantize") for n in back.nodes)
    np.testing.assert_array_equal(interpreter.run(back, [held_out])[0], interpreter.run(g, [held_out])[0])


def test_fallback_puts_the_worst_layer_back_first_and_meets_the_floor(setup):
    g, calib, held_out = setup
    q, stats = run(g, f"{CALIB},quant-fallback", calib)  # no budget: sensitivities only
    sens = stats["sensitivity_db"]
    assert len(sens) == 6 and stats["fallback"] == [] and stats["met"] is None
    worst = min(sens, key=sens.get)
    before = sqnr(interpreter.run(g, [calib])[0], interpreter.run(q, [calib])[0])
    floor = round(before + 3, 1)
    out, stats = run(g, f"{CALIB},quant-fallback{{sqnr_floor={floor}}}", calib)
    assert stats["met"] and stats["fallback"][0] == worst
    assert stats["before"]["output_sqnr_db"] < floor <= stats["after"]["output_sqnr_db"]
    assert sqnr(interpreter.run(g, [calib])[0], interpreter.run(out, [calib])[0]) >= floor
    node = out.node(worst)  # back in float: reads a float value and the float model's weights
    assert out.producer(node.inputs[0]) is None or out.producer(node.inputs[0]).op != "dequantize"
    if node.op in ("conv2d", "dense"):
        np.testing.assert_array_equal(out.weight(node.inputs[1]), g.weight(g.node(worst).inputs[1]))
    assert 0 < stats["int8_mac_share"] < 1
    folded, _ = PassManager("fold-qdq").run(out)  # the mixed graph folds, and computes what the QDQ one does
    np.testing.assert_allclose(interpreter.run(folded, [held_out])[0], interpreter.run(out, [held_out])[0],
                               atol=0.05 * np.abs(interpreter.run(out, [held_out])[0]).max())


def test_fallback_after_bias_correction_corrects_again(setup):
    g, calib, held_out = setup
    q, _ = run(g, CALIB, calib)
    c, _ = run(g, f"{CALIB},bias-correct", calib)
    # an unreachable floor with at most two nodes in float: the two most sensitive ones go back
    out, stats = run(g, f"{CALIB},bias-correct,quant-fallback{{sqnr_floor=200,max_layers=2}}", calib)
    sens = stats["sensitivity_db"]
    assert stats["met"] is False and stats["fallback"] == sorted(sens, key=sens.get)[:2]
    fallen = set(stats["fallback"])
    order = [n.name for n in g.nodes]
    first = min(order.index(name) for name in fallen)
    later = 0
    for n in int8_nodes(out, ("conv2d", "dense")):  # the int8 layers left are corrected again: as before upstream
        bias, before = out.weight(n.inputs[2]), c.weight(c.node(n.name).inputs[2])  # of the first float node,
        assert not np.array_equal(bias, q.weight(q.node(n.name).inputs[2]))  # anew (without it) after it
        assert np.array_equal(bias, before) == (order.index(n.name) < first)
        later += order.index(n.name) > first
    assert later > 0
    for name in fallen & {n.name for n in g.nodes if n.op in ("conv2d", "dense")}:
        np.testing.assert_array_equal(out.weight(out.node(name).inputs[2]), g.weight(g.node(name).inputs[2]))


def test_fallback_with_a_user_metric_needs_labels(setup):
    g, calib, _ = setup
    labels = interpreter.run(g, [calib])[0].argmax(1)  # the float model is right by definition
    ds = data.from_arrays([calib], labels)
    pipeline = f"{CALIB},quant-fallback{{max_drop=0.0,metric=test_quant_recovery:accuracy}}"
    out, records = PassManager(pipeline, context=PassContext(calib=ds)).run(g)
    stats = records[-1].pass_stats
    assert stats["met"] and stats["after"]["test_quant_recovery:accuracy"] == 1.0
    with pytest.raises(PipelineError, match="labelled data"):
        run(g, pipeline, calib)
    with pytest.raises(PipelineError, match="max_drop=1.5"):
        run(g, f"{CALIB},quant-fallback{{max_drop=1.5}}", calib)
    with pytest.raises(PipelineError, match="cannot load metric"):
        run(g, f"{CALIB},quant-fallback{{max_drop=0.1,metric=no_such_module:f}}", calib)


def test_compile_flags_build_the_int8_pipeline():
    base = "canonicalize,fold-bn,fuse-act"
    int8 = f"{base},calibrate{{method=mse}},quantize,round-weights,bias-correct"
    assert backend_pipeline(base, True, "mse") == f"{int8},fold-qdq"
    assert backend_pipeline(base, True, "mse", max_drop=0.02, sqnr_floor=25.0) == (
        f"{int8},quant-fallback{{max_drop=0.02,sqnr_floor=25.0}},fold-qdq")
    PassManager(backend_pipeline(base, True, "mse", 0.01, None, "pkg.mod:acc"))  # parses
    assert backend_pipeline(base, True, "mse", max_drop=0.02, fallback_to="int16") == (
        f"{int8},quant-fallback{{max_drop=0.02,to=int16}},fold-qdq")
    ladder = backend_pipeline(base, True, "mse", sqnr_floor=30.0, fallback_to="int16+float")
    assert ladder == f"{int8},quant-fallback{{sqnr_floor=30.0,to=int16+float}},fold-qdq"
    PassManager(ladder)  # parses: '+' is fine inside an option value
    with pytest.raises(SlimcError, match="give the budget too"):
        backend_pipeline(base, True, "mse", fallback_to="int16")
    for kwargs, needle in [({"max_drop": 1.5}, "outside [0, 1]"), ({"sqnr_floor": -3.0}, "positive"),
                           ({"metric": "pkg.mod:acc"}, "needs --max-drop"),
                           ({"max_drop": 0.1, "metric": "acc"}, "package.module:callable")]:
        with pytest.raises(SlimcError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            backend_pipeline(base, True, "mse", **kwargs)
    with pytest.raises(SlimcError, match="add --int8"):
        backend_pipeline(base, False, "mse", max_drop=0.02)
    qat = backend_pipeline(base, True, "mse", max_drop=0.02, fallback_to="int16", qat=2)
    assert qat.startswith(f"{int8},quant-fallback{{max_drop=0.02,to=int16}},distill{{epochs=2,") \
        and qat.endswith("},fold-qdq")  # fine-tuning after the fallback decided the grids
    PassManager(qat)  # parses
    for flags in [(False, 2), (True, 0)]:
        with pytest.raises(SlimcError, match="--qat"):
            backend_pipeline(base, flags[0], "mse", qat=flags[1])
    with pytest.raises(SlimcError, match="already quantizes"):
        backend_pipeline(f"{base},calibrate,quantize", True, "mse", max_drop=0.02)


def test_compile_rejects_bad_budget_flags_cleanly(tmp_path, capsys):
    rc = main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--int8", "--max-drop", "2"])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("slimc: error: --max-drop 2.0 is outside [0, 1]") and len(err.splitlines()) == 1


def test_prefix_search_finds_the_smallest_meeting_prefix_past_a_known_miss():
    from slimc.passes.quant.fallback import _smallest_prefix

    for lo, cap in [(0, 1), (0, 7), (0, 64), (5, 9), (59, 76)]:
        for need in range(lo + 1, cap + 1):  # a monotone budget: prefixes of `need` steps or more meet it
            tried: list[int] = []

            def attempt(k: int) -> bool:
                assert lo < k <= cap, (k, lo, cap)  # never re-tries the known miss, never passes the cap
                tried.append(k)
                return k >= need

            assert _smallest_prefix(attempt, lo, cap) == need
            assert len(tried) <= 2 * max(1, (cap - lo).bit_length()) + 1  # doubling, then bisection
        assert _smallest_prefix(lambda k: False, lo, cap) is None
