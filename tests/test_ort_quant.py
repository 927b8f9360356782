"""slimc.ort_quant: ONNX Runtime's static int8 QDQ reference on a tiny CNN exported by slimc, and its baseline row."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from slimc import data, export
from slimc.frontend.torch import from_torch
from slimc.ort_quant import OrtQuantError, calibration_feeds, ort_session, quantize_with_ort
from tiny_models import convnet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CNN (conv, BN, depthwise, residual, dense) exported with a free and with a fixed batch size."""
    model = convnet()
    d = tmp_path_factory.mktemp("ortq")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 16, 16, 16, generator=g).numpy()
    paths = {}
    for dyn in (True, False):
        paths[dyn] = str(d / f"tiny-{'dyn' if dyn else 'b1'}.onnx")
        export.to_onnx(from_torch(model, (torch.from_numpy(x[:1]),), dynamic_batch=dyn), paths[dyn])
    with torch.no_grad():
        ref = model(torch.from_numpy(x[64:])).numpy()
    return {"dir": d, "paths": paths, "calib": x[:64], "eval": x[64:], "ref": ref}


def _run(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path, 1)
    name = sess.get_inputs()[0].name
    bs = sess.get_inputs()[0].shape[0]
    step = bs if isinstance(bs, int) else len(x)
    return np.concatenate([sess.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def _inits(path: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    m = onnx.load(path)
    return m, {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def test_qdq_model_has_per_channel_s8_weights_u8_activations_and_tracks_fp32(tiny):
    out = quantize_with_ort(tiny["paths"][True], tiny["dir"] / "q-minmax.onnx", [tiny["calib"]], "minmax")
    m, inits = _inits(out)
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    per_channel = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4:
            w, scale = inits[n.input[0]], inits[n.input[1]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            assert w.dtype == np.int8
            per_channel.append(scale.shape == (w.shape[axis],) and axis == 0 and len(np.unique(scale)) > 1)
    assert len(per_channel) == 3 and all(per_channel)  # c1, dw, pw
    act_zero_points = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zero_points and all(z.dtype == np.uint8 for z in act_zero_points)
    got = _run(out, tiny["eval"])
    assert _sqnr(tiny["ref"], got) > 30
    assert np.abs(got - tiny["ref"]).max() <= 0.05 * np.ptp(tiny["ref"])
    assert (got.argmax(1) == tiny["ref"].argmax(1)).mean() >= 0.9


def test_entropy_and_percentile_calibrate_differently_from_minmax(tiny):
    scales = {}
    small = {"minmax": None, "entropy": {"num_bins": 512, "num_quantized_bins": 256},  # the KL search is slow Python
             "percentile": {"num_bins": 512, "percentile": 99.9}}
    for method, options in small.items():
        out = quantize_with_ort(tiny["paths"][True], tiny["dir"] / f"q-{method}.onnx", [tiny["calib"]], method,
                                calibrator_options=options)
        assert _sqnr(tiny["ref"], _run(out, tiny["eval"])) > 20
        m, inits = _inits(out)
        scales[method] = {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["entropy"] != scales["minmax"]  # ORT's own entropy defaults would collapse to min-max
    assert scales["percentile"] != scales["minmax"]


def test_dataset_and_array_batches_give_the_same_model_even_at_fixed_batch(tiny):
    a = quantize_with_ort(tiny["paths"][False], tiny["dir"] / "b1-arrays.onnx",
                          [tiny["calib"][i:i + 10] for i in range(0, 64, 10)], "minmax")
    b = quantize_with_ort(tiny["paths"][False], tiny["dir"] / "b1-dataset.onnx",
                          data.from_arrays([tiny["calib"]]), "minmax")
    c = quantize_with_ort(tiny["paths"][False], tiny["dir"] / "b1-single.onnx", list(tiny["calib"]), "minmax")
    ia, ib, ic = (_inits(p)[1] for p in (a, b, c))
    assert ia.keys() == ib.keys() == ic.keys()
    assert all(np.array_equal(ia[k], ib[k]) and np.array_equal(ia[k], ic[k]) for k in ia)
    assert len(calibration_feeds(tiny["paths"][False], [tiny["calib"]])) == 64  # re-batched to the fixed batch 1
    tail = calibration_feeds(tiny["paths"][True], [tiny["calib"][:21]], batch_size=8)  # free batch keeps the tail
    assert [next(iter(f.values())).shape[0] for f in tail] == [8, 8, 5]
    assert _sqnr(tiny["ref"], _run(a, tiny["eval"])) > 30


def test_clear_errors(tiny):
    path = tiny["paths"][True]
    with pytest.raises(OrtQuantError, match="unknown calibration method"):
        quantize_with_ort(path, tiny["dir"] / "x.onnx", [tiny["calib"]], "kl")
    with pytest.raises(OrtQuantError, match="does not fit model input"):
        quantize_with_ort(path, tiny["dir"] / "x.onnx", [np.zeros((4, 3, 16, 16), np.float32)])
    with pytest.raises(OrtQuantError, match="empty"):
        quantize_with_ort(path, tiny["dir"] / "x.onnx", [])
    with pytest.raises(OrtQuantError, match="does not exist"):
        quantize_with_ort(tiny["dir"] / "missing.onnx", tiny["dir"] / "x.onnx", [tiny["calib"]])
    assert not (tiny["dir"] / "x.onnx").exists()


def test_compile_baselines_add_an_ort_int8_row_with_calibration(tiny):
    from slimc.compile import baselines
    from slimc.models import load_model

    loaded = load_model("tiny_models:convnet")
    sample = [tiny["eval"][:1]]
    rows = baselines(loaded, sample, repeat=1, number=1, warmup=0)
    assert [r["name"] for r in rows] == ["PyTorch eager", "ONNX Runtime fp32"]
    rows = baselines(loaded, sample, repeat=1, number=1, warmup=0, calibration=[tiny["calib"]])
    assert [r["name"] for r in rows] == ["PyTorch eager", "ONNX Runtime fp32", "ONNX Runtime int8"]
    assert rows[-1]["calibration"] == "minmax" and rows[-1]["quantize_seconds"] > 0 and rows[-1]["median_ms"] > 0
