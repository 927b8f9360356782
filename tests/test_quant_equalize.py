"""equalize (cross-layer equalization): exact in fp32 where it claims to be, balanced ranges, relu6 handling."""

import numpy as np
import pytest
import torch

from slimc import interpreter
from slimc.errors import PipelineError
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassManager
from slimc.passes.quant.equalize import find_pairs, input_ranges, output_ranges, range_balance


class Chain(torch.nn.Module):
    """MobileNet-like chains: expand 1x1 -> relu -> dw 3x3 -> relu -> project 1x1 -> next conv, a relu6 pair, and a
    residual branch (a value with two readers, which must not be rescaled)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = torch.nn.Conv2d(4, 12, 1)
        self.dw = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.project = torch.nn.Conv2d(12, 6, 1)
        self.grouped = torch.nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.six = torch.nn.Conv2d(6, 8, 1)
        self.after_six = torch.nn.Conv2d(8, 6, 1)
        self.fc1 = torch.nn.Linear(6, 10)
        self.fc2 = torch.nn.Linear(10, 3)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.expand(x))))
        y = self.grouped(self.project(y))
        z = self.after_six(torch.nn.functional.relu6(self.six(y)))
        y = y + z  # y has two readers: six and this add
        return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))


def imbalanced_chain() -> torch.nn.Module:
    """Random weights with output-channel scales spread over four orders of magnitude, as after BN folding."""
    torch.manual_seed(0)
    m = Chain().eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for layer in (m.expand, m.dw, m.project, m.six, m.fc1):
            s = torch.from_numpy(np.exp(rng.uniform(-4.5, 4.5, layer.weight.shape[0])).astype(np.float32))
            layer.weight.mul_(s.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            layer.bias.mul_(s)
    return m


@pytest.fixture(scope="module")
def graph():
    g = from_torch(imbalanced_chain(), (torch.randn(2, 4, 8, 8),), dynamic_batch=True, name="chain")
    return PassManager("canonicalize,fold-bn,fuse-act").run(g)[0]


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((4, 4, 8, 8)).astype(np.float32)


def test_pairs_follow_the_chains_and_skip_shared_values(graph):
    pairs = {(graph.node(p.first).op, graph.node(p.second).attrs.get("groups"), p.bounded) for p in find_pairs(graph)}
    firsts = {p.first: p for p in find_pairs(graph)}
    convs = [n.name for n in graph.nodes if n.op == "conv2d"]
    expand, dw, project, grouped, six, after_six = convs
    assert firsts[expand].second == dw and firsts[dw].second == project and firsts[project].second == grouped
    assert firsts[six].second == after_six and firsts[six].bounded  # relu6 between them
    assert grouped not in firsts and after_six not in firsts  # their outputs have two readers / feed an add
    dense = [n.name for n in graph.nodes if n.op == "dense"]
    assert firsts[dense[0]].second == dense[1]
    assert ("conv2d", 12, False) in pairs  # expand -> depthwise


def test_equalize_keeps_fp32_outputs_and_balances_ranges(graph, x):
    ref = interpreter.run(graph, [x])[0]
    out, records = PassManager("equalize").run(graph)
    stats = records[-1].pass_stats
    assert stats["pairs"] == 4 and stats["skipped_relu6"] == 1 and stats["relu6_replaced"] == 0
    assert stats["balance_before"] < 0.2 and stats["balance_after"] > 0.99
    got = interpreter.run(out, [x])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # each pair's shared channels now have the same range on both sides; a layer in two pairs (the depthwise one)
    # converges to a balance of both
    for p in find_pairs(out):
        if p.bounded:
            continue
        a, b = out.node(p.first), out.node(p.second)
        r1, r2 = output_ranges(out.weight(a.inputs[1])), input_ranges(out.weight(b.inputs[1]), b.attrs["groups"]
                                                                       if b.op == "conv2d" else 1)
        np.testing.assert_allclose(r1, r2, rtol=2e-3)
    assert range_balance(out, find_pairs(out)) > range_balance(graph, find_pairs(graph))
    assert np.array_equal(interpreter.run(graph, [x])[0], ref)  # the input graph's weights are untouched


def test_relu6_pairs_only_with_relu6_relu(graph, x):
    skipped, _ = PassManager("equalize{relu6=skip}").run(graph)
    six = [n for n in graph.nodes if n.op == "conv2d"][4].name
    assert skipped.node(six).attrs["act"] == "relu6"
    replaced, records = PassManager("equalize{relu6=relu}").run(graph)
    assert records[-1].pass_stats["relu6_replaced"] == 1 and replaced.node(six).attrs["act"] == "relu"
    # exact only where the relu6 never clipped: compare with the float model with relu6 replaced by relu
    relu_model = graph.replace(nodes=tuple(n.replace(attrs={**n.attrs, "act": "relu"}) if n.name == six else n
                                           for n in graph.nodes))
    ref = interpreter.run(relu_model, [x])[0]
    np.testing.assert_allclose(interpreter.run(replaced, [x])[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_bad_options(graph):
    with pytest.raises(PipelineError, match="relu6='clip'.*skip.*relu"):
        PassManager("equalize{relu6=clip}").run(graph)
    with pytest.raises(PipelineError, match="iterations=0"):
        PassManager("equalize{iterations=0}").run(graph)
