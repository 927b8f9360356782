"""Pruning recovery passes: bn-reestimate (batch-norm statistics from data) and distill (knowledge distillation from
the pipeline's input model), their checkpoints, errors, and `--data` on the command line."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from slimc import interpreter, ir
from slimc.data import from_arrays
from slimc.errors import PipelineError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PASSES, PassContext, PassManager
from tiny_models import bn_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
PRUNE = "prune{ratio=0.5,round_to=1}"


def images(n: int, seed: int) -> np.ndarray:
    """Inputs with per-channel offsets and spatial structure (not zero-mean noise, so statistics matter)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3, 12, 12)).astype(np.float32)
    ramp = np.linspace(-1, 1, 12, dtype=np.float32)
    return base + ramp[None, None, :, None] + np.array([0.5, -0.3, 1.0], np.float32)[None, :, None, None]


TRAIN, HELD_OUT = images(384, 0), images(256, 1)


@pytest.fixture(scope="module")
def teacher() -> ir.Graph:
    """bn_net with its batch-norm statistics measured on TRAIN (what a trained model would have)."""
    m = bn_net()
    for bn in (m.bn1, m.bn2):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():
        m(torch.from_numpy(TRAIN))
        m.fc.weight.mul_(4.0)  # confident logits, so that the KL has something to measure
    m.eval()
    return from_torch(m, (torch.from_numpy(TRAIN[:2]),), dynamic_batch=True)


def run(pipeline: str, g: ir.Graph, data=None, reference=None, log=None) -> tuple[ir.Graph, list]:
    ctx = PassContext(data=data, reference=reference, log=log or (lambda m: None))
    return PassManager(pipeline, context=ctx).run(g)


def measured_bn_error(g: ir.Graph, x: np.ndarray) -> float:
    """Largest gap between a batch_norm's stored statistics and those of its input on `x` (in units of the std)."""
    bns = {n.inputs[0]: n for n in g.nodes if n.op == "batch_norm"}
    seen = {}

    def hook(node, outs):
        for o, t in zip(node.outputs, outs):
            if o in bns:
                seen[o] = t.double()

    with torch.no_grad():
        interpreter.GraphModule(g)(torch.from_numpy(x), hook=hook)
    worst = 0.0
    for v, bn in bns.items():
        mean, var = seen[v].mean((0, 2, 3)).numpy(), seen[v].var((0, 2, 3), unbiased=False).numpy()
        stored_mean, stored_var = g.weights[bn.inputs[3]], g.weights[bn.inputs[4]]
        worst = max(worst, float(np.max(np.abs(stored_mean - mean) / np.sqrt(var))),
                    float(np.max(np.abs(stored_var / var - 1))))
    return worst


def kl_on(student: ir.Graph, teacher: ir.Graph, x: np.ndarray) -> float:
    s = torch.from_numpy(interpreter.run(student, [x])[0]).double()
    t = torch.from_numpy(interpreter.run(teacher, [x])[0]).double()
    return float(torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean"))


def test_bn_reestimate_after_pruning_matches_the_data(teacher):
    assert measured_bn_error(teacher, TRAIN) < 0.05  # the teacher's statistics are the data's
    pruned, _ = run(PRUNE, teacher)
    stale = measured_bn_error(pruned, TRAIN)
    assert stale > 0.3, stale  # pruning c1's channels changed what bn2 sees
    fixed, records = run("bn-reestimate{batch_size=32}", pruned, from_arrays([TRAIN]))
    assert measured_bn_error(fixed, TRAIN) < 0.05 < stale
    assert records[-1].pass_stats["batch_norms"] == 2 and records[-1].pass_stats["samples"] == len(TRAIN)
    assert fixed.param_types == pruned.param_types
    assert measured_bn_error(pruned, TRAIN) == stale  # the input graph is untouched
    _, records = run("bn-reestimate{batches=2,batch_size=32}", pruned, from_arrays([TRAIN]))
    assert records[-1].pass_stats["samples"] == 64


def test_bn_reestimate_without_batch_norm_says_so(teacher):
    folded, _ = run("fold-bn", teacher)
    out, records = run("bn-reestimate", folded)  # no data needed when there is nothing to do
    assert out is folded and not records[-1].changed
    assert "no batch_norm" in records[-1].pass_stats["note"]


def test_distill_lowers_the_kl_to_the_teacher_on_held_out_data(teacher):
    lines = []
    g, records = run(f"{PRUNE},bn-reestimate,distill{{epochs=4,lr=0.05,batch_size=32,progress=false}}", teacher,
                     from_arrays([TRAIN]), log=lines.append)
    pruned = run(f"{PRUNE},bn-reestimate", teacher, from_arrays([TRAIN]))[0]
    before, after = kl_on(pruned, teacher, HELD_OUT), kl_on(g, teacher, HELD_OUT)
    assert after < 0.5 * before, (before, after)
    stats = records[-1].pass_stats
    assert [h["epoch"] for h in stats["history"]] == [1, 2, 3, 4]
    assert stats["history"][-1]["kl"] < stats["history"][0]["kl"]
    assert sum("distill: epoch" in m for m in lines) == 4
    assert g.param_types == pruned.param_types  # same shapes, new values


def test_distill_with_labels_and_feature_matching_on_a_pruned_value(teacher):
    labels = interpreter.run(teacher, [TRAIN])[0].argmax(1)
    pruned = run(PRUNE, teacher)[0]
    conv1 = next(n for n in pruned.nodes if n.op == "conv2d").outputs[0]
    assert pruned.type_of(conv1).shape[1] < teacher.type_of(conv1).shape[1]  # channels differ: an adapter maps them
    _, records = run(f"distill{{epochs=2,lr=0.02,alpha=0.5,features={conv1},progress=false}}", pruned,
                     from_arrays([TRAIN], labels), reference=teacher)
    h = records[-1].pass_stats["history"]
    assert {"kl", "ce", "feat"} <= set(h[0]) and h[-1]["feat"] < h[0]["feat"]


def test_checkpoint_resume_gives_the_uninterrupted_result(teacher, tmp_path):
    pruned = run(f"{PRUNE},bn-reestimate", teacher, from_arrays([TRAIN]))[0]
    data = from_arrays([TRAIN])
    ckpt = tmp_path / "ck" / "student.slimc"
    saved = tmp_path / "after-epoch-1"

    def keep_epoch_one(msg: str) -> None:
        if "epoch 2/2" in msg:  # logged before epoch 2 is saved: the files on disk are epoch 1's
            shutil.copytree(ckpt.parent, saved)

    pipeline = f"distill{{epochs=2,lr=0.05,batch_size=32,checkpoint={ckpt},progress=false,optimizer=sgd}}"
    full, _ = run(pipeline, pruned, data, teacher, log=keep_epoch_one)
    assert json.loads((saved / "student.slimc.json").read_text())["epoch"] == 1
    assert ir.load(ckpt) == full
    shutil.rmtree(ckpt.parent)
    shutil.copytree(saved, ckpt.parent)
    resumed, records = run(pipeline, pruned, data, teacher)
    assert records[-1].pass_stats["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in records[-1].pass_stats["history"]] == [1, 2]
    for k in full.weights:
        np.testing.assert_allclose(resumed.weights[k], full.weights[k], rtol=1e-5, atol=1e-6)
    done, records = run(pipeline, pruned, data, teacher)  # finished: nothing left to train
    assert records[-1].pass_stats["resumed_from_epoch"] == 2
    assert all(np.array_equal(done.weights[k], resumed.weights[k]) for k in done.weights)
    with pytest.raises(PipelineError, match="written by another distillation"):
        run(pipeline.replace("lr=0.05", "lr=0.04"), pruned, data, teacher)
    with open(str(ckpt) + ".state.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(PipelineError, match="does not match .*interrupted save"):
        run(pipeline, pruned, data, teacher)


def test_distill_errors(teacher):
    pruned = run(PRUNE, teacher)[0]
    with pytest.raises(PipelineError, match="pass --train or --data"):
        run("distill", pruned, reference=teacher)
    with pytest.raises(PipelineError, match="pass --train or --data"):
        run("bn-reestimate", pruned)
    with pytest.raises(PipelineError, match="unpruned model as teacher"):
        PASSES["distill"].fn(pruned, PassContext(options={**{k: o.default for k, o in PASSES["distill"].options.items()}},
                                                 data=from_arrays([TRAIN])))
    with pytest.raises(PipelineError, match="alpha=2.0"):
        run("distill{alpha=2}", pruned, from_arrays([TRAIN]), teacher)
    with pytest.raises(PipelineError, match="optimizer='lbfgs'"):
        run("distill{optimizer=lbfgs}", pruned, from_arrays([TRAIN]), teacher)
    with pytest.raises(PipelineError, match="features=nowhere names %nowhere"):
        run("distill{features=nowhere,progress=false}", pruned, from_arrays([TRAIN]), teacher)


def test_cli_data_option_runs_recovery_and_reports_a_missing_one(tmp_path, capsys):
    from slimc.cli import main

    np.save(tmp_path / "x.npy", TRAIN[:64])
    args = ["inspect", "tiny_models:bn_net", "--dynamic-batch", "--passes"]
    assert main([*args, f"{PRUNE},bn-reestimate,distill{{epochs=1}},fold-bn", "--data", str(tmp_path / "x.npy"),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    steps = json.loads(out)["steps"]
    assert steps[2]["pass_stats"]["samples"] == 64 and steps[3]["pass_stats"]["steps"] == 1
    assert "distill: epoch 1/1 loss" in err
    assert main([*args, "distill"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("slimc: error: ") and "pass --train or --data" in err
    assert main([*args, "", "--calib", str(tmp_path / "x.npy:resize=8")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("slimc: error: --calib") and "not a folder" in err
