"""Quantization-aware training: the interpreter's fake-quant mode computes exactly what the QDQ graph computes, its
straight-through gradients reach the float master weights and biases (not the calibrated grids), and `distill` on a
QDQ graph trains it quantization-aware into int8 weights on the same scales."""

import numpy as np
import pytest
import torch

from slimc import data, interpreter, ir
from slimc.errors import PipelineError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassContext, PassManager
from slimc.passes.distill import is_qdq

import tiny_models

QUANTIZE = "calibrate{method=minmax},quantize"


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, 32, 32)) + np.linspace(-1, 1, 32)[None, None, None]).astype(np.float32)


TRAIN, HELD_OUT = images(192, 0), images(64, 1)


@pytest.fixture(scope="module")
def graphs() -> tuple[ir.Graph, ir.Graph]:
    """(float graph, its int8 QDQ graph) of dw_net, calibrated on TRAIN."""
    m = tiny_models.dw_net()
    g = from_torch(m, (torch.from_numpy(TRAIN[:1]),), dynamic_batch=True, name="dw")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    q, _ = PassManager(QUANTIZE, context=PassContext(calib=data.from_arrays([TRAIN[:64]]))).run(g)
    return g, q


def kl(student: ir.Graph, teacher: ir.Graph, x: np.ndarray) -> float:
    s = torch.from_numpy(interpreter.run(student, [x])[0]).double()
    t = torch.from_numpy(interpreter.run(teacher, [x])[0]).double()
    return float(torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean"))


def test_fake_quant_forward_is_the_qdq_graph(graphs):
    _, q = graphs
    assert is_qdq(q) and not is_qdq(graphs[0])
    x = torch.from_numpy(HELD_OUT)
    with torch.no_grad():
        exact = interpreter.GraphModule(q)(x)
        fake = interpreter.GraphModule(q, trainable=True, fake_quant=True)(x)
    assert torch.equal(exact, fake)


def test_untrained_masters_round_trip_to_the_same_int8_weights(graphs):
    _, q = graphs
    module = interpreter.GraphModule(q, trainable=True, fake_quant=True)
    masters = interpreter.weight_masters(q)
    assert masters and all(q.weights[w].dtype == np.int8 for w in masters)
    back = module.to_graph()
    for name, arr in q.weights.items():
        assert back.weights[name].dtype == arr.dtype and back.weights[name].shape == np.shape(arr), name
        assert np.array_equal(back.weights[name], arr), name


def test_straight_through_gradients_reach_masters_and_biases_not_grids(graphs):
    _, q = graphs
    module = interpreter.GraphModule(q, trainable=True, fake_quant=True)
    module(torch.from_numpy(TRAIN[:16])).square().sum().backward()
    params = module.named_graph_parameters()
    masters = interpreter.weight_masters(q)
    assert all(params[w].grad is not None and params[w].grad.abs().sum() > 0 for w in masters)
    biases = {n.inputs[2] for n in q.nodes if n.op == "conv2d" and len(n.inputs) > 2}
    assert biases and all(params[b].grad is not None for b in biases)
    grids = interpreter.quant_params(q)
    assert grids and all(not params[v].requires_grad for v in grids if params[v].is_floating_point())


def test_clipped_straight_through_estimator():
    x = torch.tensor([-1.0, 0.02, 0.5, 3.0], requires_grad=True)
    q = interpreter.fake_quantize(x, torch.tensor(0.01), torch.tensor(0, dtype=torch.uint8), torch.uint8, 0)
    assert q.tolist() == [0.0, 2.0, 50.0, 255.0]
    q.sum().backward()
    assert x.grad.tolist() == [0.0, 100.0, 100.0, 0.0]  # d(x/s)/dx inside the grid, 0 where it saturates


def test_distill_on_a_qdq_graph_trains_int8_weights_on_their_scales(graphs):
    g, q = graphs
    student = q.replace(weights={k: (v + np.float32(0.05) * np.sign(v) if k.endswith(".bias") else v)
                                 for k, v in q.weights.items()})  # something to recover
    before = kl(student, g, HELD_OUT)
    ctx = PassContext(data=data.from_arrays([TRAIN]), reference=g, log=lambda m: None)
    out, records = PassManager("distill{epochs=4,optimizer=adam,lr=0.001,batch_size=32,temperature=1,alpha=1,"
                               "progress=false}", context=ctx).run(student)
    after = kl(out, g, HELD_OUT)
    assert after < 0.7 * before, (before, after)
    masters = interpreter.weight_masters(q)
    changed = 0
    for w, dq in masters.items():
        assert out.weights[w].dtype == np.int8 and out.weights[w].min() >= -127
        changed += int((out.weights[w] != q.weights[w]).sum())
        for v in dq.inputs[1:]:
            assert np.array_equal(out.weights[v], q.weights[v])  # scales and zero points untouched
    assert changed > 0
    folded, _ = PassManager("fold-qdq").run(out)  # still a graph fold-qdq turns into integer ops
    assert any(n.op == "qconv2d" for n in folded.nodes)
    ref = interpreter.run(out, [HELD_OUT])[0]
    got = interpreter.run(folded, [HELD_OUT])[0]
    assert np.abs(ref - got).max() <= 0.05 * np.abs(ref).max()


def test_distill_refuses_a_graph_already_folded_into_integer_ops(graphs):
    g, q = graphs
    folded, _ = PassManager("fold-qdq").run(q)
    ctx = PassContext(data=data.from_arrays([TRAIN]), reference=g, log=lambda m: None)
    with pytest.raises(PipelineError, match="between quantize and fold-qdq"):
        PassManager("distill{progress=false}", context=ctx).run(folded)


def test_qat_resumed_from_a_checkpoint_keeps_the_masters_fractions(graphs, tmp_path):
    """A checkpoint's graph holds the int8-rounded weights; the float masters' fractions below one step are saved
    beside it, so training resumed after epoch 1 ends with the int8 weights of the uninterrupted run."""
    import shutil

    g, q = graphs
    ckpt = tmp_path / "ck" / "qat.slimc"
    saved = tmp_path / "after-epoch-1"

    def keep_epoch_one(msg: str) -> None:
        if "epoch 2/2" in msg:  # logged before epoch 2 is saved: the files on disk are epoch 1's
            shutil.copytree(ckpt.parent, saved)

    def run(log=lambda m: None):
        ctx = PassContext(data=data.from_arrays([TRAIN[:96]]), reference=g, log=log)
        return PassManager(f"distill{{epochs=2,optimizer=adam,lr=0.003,batch_size=32,temperature=1,alpha=1,"
                           f"checkpoint={ckpt},progress=false}}", context=ctx).run(q)

    full, _ = run(keep_epoch_one)
    shutil.rmtree(ckpt.parent)
    shutil.copytree(saved, ckpt.parent)
    resumed, records = run()
    assert records[-1].pass_stats["resumed_from_epoch"] == 1
    moved = sum(int((full.weights[w] != q.weights[w]).sum()) for w in interpreter.weight_masters(q))
    assert moved > 0  # training moved int8 weights, so the comparison below has something to lose
    for k in full.weights:
        np.testing.assert_array_equal(resumed.weights[k], full.weights[k], err_msg=k)
