"""Acceptance over the torchvision zoo: the prune pass at 30 % global on every model runs, keeps the output shape,
cuts MACs as predicted, and pruning the same channels after zeroing what they feed changes nothing."""

from functools import lru_cache

import numpy as np
import pytest
import torch
import torchvision

from prune_checks import assert_zero_exact
from slimc import interpreter, ir
from slimc.frontend.torch import from_torch
from slimc.ir import Graph
from slimc.pass_manager import PassManager
from slimc.passes.prune.apply import predict, prune_units
from slimc.passes.prune.dependency import analyze
from slimc.passes.prune.importance import PruneConfig, select
from test_zoo import ZOO, _randomize_norms


@lru_cache(maxsize=2)
def imported(name: str, size: int) -> tuple[Graph, tuple[np.ndarray, ...]]:
    """The model through canonicalize,fold-bn,fuse-act (the pipeline prune follows), and an input batch."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    _randomize_norms(model)
    x = torch.randn(1, 3, size, size)
    graph, _ = PassManager("canonicalize,fold-bn,fuse-act").run(from_torch(model, (x,)))
    return graph, (x.numpy(),)


def _check_30_percent(name: str, size: int) -> None:
    g, x = imported(name, size)
    pruned, records = PassManager("prune{ratio=0.3}").run(g)  # verifies the result
    stats = records[-1].pass_stats
    a = analyze(g)
    sel = select(g, a, PruneConfig(ratio=0.3))
    assert ir.print_graph(prune_units(g, a, sel.pruned)) == ir.print_graph(pruned)
    assert abs(stats["channels_removed"] - 0.3 * stats["channels_prunable"]) <= 0.02 * stats["channels_prunable"]
    (y,) = interpreter.run(pruned, list(x))
    assert y.shape == g.type_of(g.outputs[0]).shape and np.isfinite(y).all()
    assert stats["macs_after"] < stats["macs_before"] and stats["params_after"] < stats["params_before"]
    assert predict(g, a, sel.pruned) == (records[-1].stats.macs, records[-1].stats.params)
    assert_zero_exact(g, a, sel.pruned, control=False, x=list(x))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_prunes_30_percent_globally(name):
    _check_30_percent(name, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_prunes_30_percent_globally_at_224(name):
    _check_30_percent(name, 224)


def test_resnet18_groups_each_stage_residual_writers_together():
    g, _ = imported("resnet18", 64)
    a = analyze(g)

    def node(module: str) -> str:
        (hit,) = [n.name for n in g.nodes if module in n.source]
        return hit

    stages = {
        "layer1": ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
        "layer2": ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"],
        "layer3": ["layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"],
        "layer4": ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"],
    }
    for stage, writers in stages.items():
        (grp,) = a.groups_of_value(node(writers[0]))
        assert set(grp.producers) == {node(w) for w in writers}, stage
        assert not grp.is_blocked
        for i in range(2):  # each block's first conv is its own group
            inner = node(f"{stage}.{i}.conv1")
            (own,) = a.groups_of_value(inner)
            assert own.producers == (inner,) and own.consumers == (node(f"{stage}.{i}.conv2"),)
