"""round-weights (GPTQ): lower layer output error than nearest rounding, same int8 grid, composes with recovery."""

import numpy as np
import pytest
import torch

import tiny_models
from slimc import data, interpreter, ops
from slimc.errors import PipelineError
from slimc.frontend.torch import from_torch
from slimc.ir import TensorType
from slimc.pass_manager import PassContext, PassManager
from slimc.passes.quant.fold import dequantized_weight
from slimc.passes.quant.qdq import int8_nodes
from slimc.passes.quant.round_weights import Layer, patches

CALIB = "calibrate{method=minmax,cache=false},quantize"


def sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - x).astype(np.float64) ** 2).sum()))


def smooth_inputs(n: int, seed: int) -> np.ndarray:
    """Random images blurred by a 3x3 box: neighbouring pixels correlate as in real images (with white noise the
    stem's H is diagonal and no rounding beats nearest)."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 34, 34)).astype(np.float32))
    return (torch.nn.functional.avg_pool2d(x, 3, 1) * 3).numpy()


@pytest.fixture(scope="module")
def setup():
    """QuantNet (stem, conv, depthwise, pointwise, dense) with a symbolic batch, 64 calibration + 32 held-out."""
    x = smooth_inputs(96, 0)
    g = from_torch(tiny_models.quant_net(), (torch.from_numpy(x[:2]),), dynamic_batch=True, name="qnet")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    return g, x[:64], x[64:]


def run(g, pipeline: str, calib: np.ndarray | None, **ctx):
    """(graph, stats of the round-weights run) after `pipeline` with `calib` as calibration data."""
    context = PassContext(calib=None if calib is None else data.from_arrays([calib]), **ctx)
    out, records = PassManager(pipeline, context=context).run(g)
    found = [r.pass_stats for r in records if r.name.startswith("round-weights")]
    return out, (found[0] if found else None)


def values(graph, x: np.ndarray) -> dict:
    seen: dict = {}

    def hook(node, outs):
        seen.update(zip(node.outputs, outs))

    seen[graph.inputs[0][0]] = torch.from_numpy(x)
    with torch.no_grad():
        interpreter.GraphModule(graph)(torch.from_numpy(x), hook=hook)
    return seen


def linear_output(node, x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    """The layer's output without bias and activation for weight `w`."""
    lin = node.replace(attrs={**node.attrs, "act": "none", "clip_min": None, "clip_max": None})
    return interpreter.run_node(lin, [x, torch.from_numpy(np.ascontiguousarray(w, np.float32))])[0].double()


def dequantized(g, node) -> np.ndarray:
    _, q, scale = dequantized_weight(g, node.inputs[1])
    return q.astype(np.float32) * scale.reshape((-1,) + (1,) * (q.ndim - 1))


def test_gptq_lowers_every_layers_output_error_on_its_inputs(setup):
    g, calib, _ = setup
    nearest, _ = run(g, CALIB, calib)
    gptq, stats = run(g, f"{CALIB},round-weights", calib)
    assert stats["layers"] == 5 and stats["samples"] == 64 and 0 < stats["moved_share"] < 0.5
    seen = values(gptq, calib)  # each layer's int8 inputs as the re-rounded model computes them (what it fitted)
    for n in int8_nodes(gptq, ("conv2d", "dense")):
        x, w = seen[n.inputs[0]], g.weight(g.node(n.name).inputs[1])
        ref = linear_output(n, x, w)
        err_nearest = (ref - linear_output(n, x, dequantized(nearest, nearest.node(n.name)))).norm()
        err_gptq = (ref - linear_output(n, x, dequantized(gptq, n))).norm()
        assert err_gptq < 0.97 * err_nearest, n.name
        assert stats["output_error_gain_db"][n.name] > 0.1


def test_weights_stay_on_the_int8_grid_of_quantize(setup):
    g, calib, _ = setup
    nearest, _ = run(g, CALIB, calib)
    gptq, _ = run(g, f"{CALIB},round-weights", calib)
    assert [(n.op, n.inputs) for n in gptq.nodes] == [(n.op, n.inputs) for n in nearest.nodes]
    moved = 0
    for n in int8_nodes(gptq, ("conv2d", "dense")):
        name, q, scale = dequantized_weight(gptq, n.inputs[1])
        _, q0, scale0 = dequantized_weight(nearest, n.inputs[1])
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127 and q.shape == q0.shape
        np.testing.assert_array_equal(scale, scale0)  # same scales: the bias-safe floor of quantize still holds
        assert np.abs(q.astype(int) - q0.astype(int)).max() <= 3
        moved += int((q != q0).sum())
    assert moved > 0
    for v in gptq.weights:  # nothing but int8 weights changed
        if gptq.weight(v).dtype != np.int8:
            np.testing.assert_array_equal(gptq.weight(v), nearest.weight(v))


def test_nearest_method_reproduces_quantize(setup):
    g, calib, _ = setup
    nearest, _ = run(g, CALIB, calib)
    again, stats = run(g, f"{CALIB},round-weights{{method=nearest}}", calib)
    assert stats["moved_share"] == 0.0
    for n in int8_nodes(again, ("conv2d", "dense")):
        np.testing.assert_array_equal(dequantized(again, n), dequantized(nearest, nearest.node(n.name)))


def test_composes_with_bias_correct_and_fold_qdq(setup):
    g, calib, held_out = setup
    qdq, _ = run(g, f"{CALIB},round-weights,bias-correct", calib)
    folded, _ = run(g, f"{CALIB},round-weights,bias-correct,fold-qdq", calib)
    ops_ = {n.op for n in folded.nodes}
    assert {"qconv2d", "qdense"} <= ops_ and not ops_ & {"conv2d", "dense"}
    ref, q_out = interpreter.run(g, [held_out])[0], interpreter.run(qdq, [held_out])[0]
    assert sqnr(q_out, interpreter.run(folded, [held_out])[0]) > 40  # the integer graph computes the QDQ graph
    plain, _ = run(g, CALIB, calib)
    assert sqnr(ref, q_out) > sqnr(ref, interpreter.run(plain, [held_out])[0])  # and beats plain int8, held out


def test_float_target_fits_the_float_layer_output(setup):
    g, calib, _ = setup
    nearest, _ = run(g, CALIB, calib)
    fitted, stats = run(g, f"{CALIB},round-weights{{target=float}}", calib)
    assert stats["layers"] == 5
    seen_q, seen_f = values(fitted, calib), values(g, calib)
    for n in int8_nodes(fitted, ("conv2d", "dense")):
        f = g.node(n.name)
        ref = linear_output(f, seen_f[f.inputs[0]], g.weight(f.inputs[1]))  # float layer on float inputs
        x = seen_q[n.inputs[0]]
        err_nearest = (ref - linear_output(n, x, dequantized(nearest, nearest.node(n.name)))).norm()
        err_fit = (ref - linear_output(n, x, dequantized(fitted, n))).norm()
        assert err_fit < err_nearest, n.name


def test_results_do_not_depend_on_the_batch_size(setup):
    g, calib, _ = setup
    a, _ = run(g, f"{CALIB},round-weights{{batch_size=7}}", calib)
    b, _ = run(g, f"{CALIB},round-weights{{batch_size=64}}", calib)
    for n in int8_nodes(a, ("conv2d", "dense")):
        np.testing.assert_array_equal(dequantized_weight(a, n.inputs[1])[1], dequantized_weight(b, n.inputs[1])[1])


def test_needs_calibration_data_and_quantize_before_it(setup):
    g, calib, _ = setup
    q, _ = run(g, CALIB, calib)
    with pytest.raises(PipelineError, match="after quantize"):
        run(q, "round-weights", calib)
    c, _ = run(g, "calibrate{method=minmax,cache=false}", calib)
    with pytest.raises(PipelineError, match="--calib"):
        PassManager("quantize,round-weights", context=PassContext()).run(c)  # the float model, but no data
    with pytest.raises(PipelineError, match="method=adaround"):
        run(g, f"{CALIB},round-weights{{method=adaround}}", calib)


@pytest.mark.parametrize("groups,stride,dilation,padding", [(1, (1, 1), (1, 1), (1, 1, 1, 1)),
                                                            (2, (2, 1), (1, 1), (0, 1, 2, 1)),
                                                            (8, (1, 2), (2, 1), (2, 0, 1, 1))])
def test_patches_are_what_the_conv_multiplies(groups, stride, dilation, padding):
    """W_g . patches_g of each group gives conv2d's output: H of a group is the second moment of what W_g sees."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((3, 8, 9, 10)).astype(np.float32))
    w = rng.standard_normal((16, 8 // groups, 3, 2)).astype(np.float32)
    attrs = {"stride": list(stride), "dilation": list(dilation), "padding": list(padding), "groups": groups}
    n = ops.make_node("c", "conv2d", ("x", "w"), (TensorType.of(x.numpy()), TensorType.of(w)), attrs)
    y = interpreter.run_node(n, [x, torch.from_numpy(w)])[0]
    p = patches(x, n, Layer("c", "dq", "w", np.ones(16, np.float32), groups, (3, 2)))
    wg = torch.from_numpy(w).reshape(groups, 16 // groups, -1)
    got = torch.einsum("gri,ngil->ngrl", wg, p).reshape(y.shape)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)
