"""quantize (QDQ insertion) and fold-qdq (integer ops): numerics against the float model and the QDQ reference."""

import numpy as np
import pytest
import torch

from slimc import interpreter
from slimc.errors import PipelineError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassManager
from slimc.passes.quant.scheme import activation_qparams, weight_qparams

import tiny_models


def sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - x).astype(np.float64) ** 2).sum()))


def min_max_ranges(graph, x: np.ndarray) -> dict:
    """Calibration by hand (min-max over the batch) so these tests do not depend on the observers."""
    ranges: dict = {graph.inputs[0][0]: (float(x.min()), float(x.max()))}

    def hook(node, outs):
        for o, t in zip(node.outputs, outs):
            if t.is_floating_point():
                ranges[o] = (float(t.min()), float(t.max()))

    with torch.no_grad():
        interpreter.GraphModule(graph)(torch.from_numpy(x), hook=hook)
    return ranges


@pytest.fixture(scope="module")
def calibrated():
    m = tiny_models.quant_net()
    x = torch.randn(8, 3, 32, 32).numpy()
    g = from_torch(m, (torch.from_numpy(x[:1]),), name="qnet")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    return g.replace(calibration=min_max_ranges(g, x)), x


def test_qparams_put_zero_on_the_grid():
    s, z = activation_qparams(-1.0, 3.0)
    assert z == 64 and np.isclose(s, 4 / 255, rtol=1e-4)
    assert (0.0 - 0.0) == (int(z) - z)  # zero maps to an integer exactly
    s, z = activation_qparams(0.5, 2.0)  # widened to contain 0
    assert z == 0 and np.isclose(s, 2.0 / 255, rtol=1e-4)
    q, scale = weight_qparams(np.array([[1.0, -0.5], [0.0, 0.0]], np.float32))
    assert q.dtype == np.int8 and q[0].tolist() == [127, -64] and q[1].tolist() == [0, 0] and scale[1] == 1.0


def test_dequantized_activations_are_exact_in_float32():
    """(q - zp) * scale must not round: LLVM contracts it with the following add into an FMA, the interpreter not."""
    rng = np.random.default_rng(0)
    q = np.arange(256, dtype=np.float64)
    for lo, hi in zip(-rng.exponential(3.0, 200) * (rng.random(200) < 0.5), rng.exponential(10.0, 200)):
        s, z = activation_qparams(lo, hi)
        exact = (q - float(z)) * float(s)
        assert np.array_equal(exact.astype(np.float32).astype(np.float64), exact), (lo, hi, s)
        assert (hi - min(lo, 0.0)) / 255 <= float(s) <= (hi - min(lo, 0.0)) / 255 * (1 + 2.0 ** -14)  # rounded up


def test_quantize_inserts_qdq_and_stays_close(calibrated):
    g, x = calibrated
    q, records = PassManager("quantize").run(g)
    stats = records[-1].pass_stats
    assert stats["quantized"] == {"add": 1, "conv2d": 4, "dense": 1} and stats["int8_mac_share"] == 1.0
    assert all(q.weight(p).dtype in (np.int8, np.uint8, np.float32) for p in q.param_types)
    assert not any(q.type_of(n.inputs[1]).dtype == "float32" and q.is_param(n.inputs[1])
                   for n in q.nodes if n.op == "conv2d")  # every conv weight is a dequantized int8 tensor
    ref = interpreter.run(g, [x], check=False)[0]
    out = interpreter.run(q, [x], check=False)[0]
    assert sqnr(ref, out) > 25


def test_exclude_keeps_layers_in_float(calibrated):
    g, _ = calibrated
    stem = next(n.name for n in g.nodes if n.op == "conv2d")
    q, records = PassManager(f"quantize{{exclude=node:{stem}|dense}}").run(g)
    stats = records[-1].pass_stats
    assert stats["float_layers"] == [stem] + [n.name for n in g.nodes if n.op == "dense"]
    assert stats["quantized"].get("dense") is None
    with pytest.raises(PipelineError, match="potato"):
        PassManager("quantize{exclude=potato}").run(g)


def test_exclude_tells_a_node_from_an_op(calibrated):
    """The torch frontend names the first conv `conv2d`: a bare `conv2d` is ambiguous, prefixes decide."""
    g, _ = calibrated
    stem = next(n for n in g.nodes if n.op == "conv2d")
    g = g.replace(nodes=tuple(n.replace(name="conv2d") if n is stem else n for n in g.nodes))
    with pytest.raises(PipelineError, match="node:conv2d .*op:conv2d"):
        PassManager("quantize{exclude=conv2d}").run(g)
    _, rec = PassManager("quantize{exclude=node:conv2d}").run(g)
    assert rec[-1].pass_stats["float_layers"] == ["conv2d"]
    _, rec = PassManager("quantize{exclude=op:conv2d}").run(g)
    assert len(rec[-1].pass_stats["float_layers"]) == sum(n.op == "conv2d" for n in g.nodes) > 1
    with pytest.raises(PipelineError, match="node:potato"):
        PassManager("quantize{exclude=node:potato}").run(g)


def test_quantize_needs_calibration(calibrated):
    g, _ = calibrated
    with pytest.raises(PipelineError, match="calibrate"):
        PassManager("quantize").run(g.replace(calibration={}))


def test_fold_gives_integer_ops_matching_the_qdq_reference(calibrated):
    g, x = calibrated
    q, _ = PassManager("quantize").run(g)
    f, records = PassManager("fold-qdq").run(q)
    stats = records[-1].pass_stats
    assert stats["folded"]["qconv2d"] == 4 and stats["folded"]["qdense"] == 1 and stats["folded"]["qadd"] == 1
    assert stats["dequantize_left"] == 0 and stats["int8_mac_share"] == 1.0
    ops = {n.op for n in f.nodes}
    assert "conv2d" not in ops and "dense" not in ops
    # every integer value of the folded graph is the QDQ graph's quantized value of the same name up to one step:
    # the int32 bias is rounded to the accumulator's grid (as in ONNX QLinearConv), which moves about 0.1 % of the
    # values across a requantization boundary; later layers may carry such a step once more
    qv, fv = values(q, x), values(f, x)
    shared = [v for v in fv if fv[v].dtype == torch.uint8 and v in qv]
    assert len(shared) >= 6
    for v in shared:
        diff = (fv[v].int() - qv[v].int()).abs()
        assert diff.max() <= 2 and (diff == 0).float().mean() > 0.95, v
    ref, out = interpreter.run(q, [x], check=False)[0], interpreter.run(f, [x], check=False)[0]
    assert sqnr(ref, out) > 40


def values(graph, x: np.ndarray) -> dict:
    seen: dict = {}

    def hook(node, outs):
        seen.update(zip(node.outputs, outs))

    with torch.no_grad():
        interpreter.GraphModule(graph)(torch.from_numpy(x), hook=hook)
    return seen


def test_zero_point_correction_is_in_the_bias(calibrated):
    g, _ = calibrated
    f, _ = PassManager("quantize,fold-qdq").run(g)
    conv = next(n for n in f.nodes if n.op == "qconv2d" and n.attrs["x_zero_point"] != 0)
    w, bias = f.weight(conv.inputs[1]).astype(np.int64), f.weight(conv.inputs[2]).astype(np.int64)
    float_bias = np.round(bias + conv.attrs["x_zero_point"] * w.reshape(w.shape[0], -1).sum(1))
    assert bias.dtype == np.int64 and np.any(float_bias != bias)


def test_integer_graph_round_trips_through_a_slimc_file(calibrated, tmp_path):
    from slimc import ir

    g, x = calibrated
    f, _ = PassManager("quantize,fold-qdq").run(g)
    ir.save(f, str(tmp_path / "q.slimc"))
    back = ir.load(str(tmp_path / "q.slimc"))
    assert back == f and all(back.weight(k).shape == f.weight(k).shape for k in f.weights)  # scalars stay 0-d
    np.testing.assert_array_equal(interpreter.run(back, [x[:1]])[0], interpreter.run(f, [x[:1]])[0])
