"""Pruning hazard: split / slice / chunk read channel ranges; their sizes and bounds must follow what was pruned."""

import numpy as np
import torch

from prune_checks import analyzed, assert_zero_exact, group_of, kept_columns
from slimc.frontend.torch import from_torch
from slimc.passes.prune.apply import prune_units
from slimc.passes.prune.dependency import analyze

SPLIT = """\
graph @split(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,3,3]
  param %wp: f32[4,3,1,1]
  param %wq: f32[4,5,1,1]
  param %wr: f32[4,4,1,1]
  %c: f32[N,8,8,8] = conv2d(%x, %w0) {act="relu", padding=[1,1,1,1]}
  %s#0: f32[N,3,8,8], %s#1: f32[N,5,8,8] = split(%c) {axis=1, sizes=[3,5]}
  %p: f32[N,4,8,8] = conv2d(%s#0, %wp)
  %q: f32[N,4,8,8] = conv2d(%s#1, %wq)
  %sl: f32[N,4,8,8] = slice(%c) {axis=1, end=6, start=2}
  %r: f32[N,4,8,8] = conv2d(%sl, %wr)
  %t: f32[N,4,8,8] = add(%p, %q)
  %y: f32[N,4,8,8] = add(%t, %r)
  return %y
}
"""


HSPLIT = """\
graph @hsplit(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,3,3]
  param %wp: f32[4,8,1,1]
  param %wq: f32[4,8,1,1]
  %c: f32[N,8,8,8] = conv2d(%x, %w0) {act="relu", padding=[1,1,1,1]}
  %s#0: f32[N,8,3,8], %s#1: f32[N,8,5,8] = split(%c) {axis=2, sizes=[3,5]}
  %p: f32[N,4,3,8] = conv2d(%s#0, %wp)
  %q: f32[N,4,5,8] = conv2d(%s#1, %wq)
  %y: f32[N,4,8,8] = concat(%p, %q) {axis=2}
  return %y
}
"""


def _channels(a, value, idx):
    mask = np.zeros(a.num_units, bool)
    mask[a.unit_of[value][idx]] = True
    return mask


def test_channel_ranges_split_one_conv_into_groups_by_who_reads_them():
    g, a = analyzed(SPLIT)
    groups = a.groups_of_value("c")
    # c0-1 only in s#0, c2 in s#0 and the slice, c3-5 in s#1 and the slice, c6-7 only in s#1
    assert sorted(gr.channels for gr in groups) == [1, 2, 2, 3]
    assert {frozenset(gr.values) for gr in groups} == {
        frozenset({"c", "s#0"}), frozenset({"c", "s#0", "sl"}), frozenset({"c", "s#1", "sl"}), frozenset({"c", "s#1"})}
    assert group_of(a, "t").is_blocked  # it reaches the graph output


def test_split_sizes_and_slice_bounds_follow_the_pruned_channels():
    g, a = analyzed(SPLIT)
    pruned = _channels(a, "c", [1, 3, 7])
    p = prune_units(g, a, pruned)
    assert p.node("s").attrs["sizes"] == (2, 3)
    assert (p.node("sl").attrs["start"], p.node("sl").attrs["end"]) == (1, 4)
    assert kept_columns(g.weights["wp"], p.weights["wp"], 1) == [0, 2]
    assert kept_columns(g.weights["wq"], p.weights["wq"], 1) == [1, 2, 3]
    assert kept_columns(g.weights["wr"], p.weights["wr"], 1) == [0, 2, 3]
    assert_zero_exact(g, a, pruned)


def test_zero_channels_in_every_range_prune_exactly():
    g, a = analyzed(SPLIT)
    assert_zero_exact(g, a, _channels(a, "c", [0, 2, 4, 5, 6]))


def test_split_along_space_passes_channels_through():
    g, a = analyzed(HSPLIT)
    grp = group_of(a, "c")
    assert group_of(a, "s#0") is grp and group_of(a, "s#1") is grp
    assert set(grp.consumers) == {"p", "q"}
    p = assert_zero_exact(g, a, _channels(a, "c", [0, 1, 7]))
    assert p.node("s").attrs["sizes"] == (3, 5) and p.type_of("s#1").shape == ("N", 5, 5, 8)


def test_strided_channel_slice_blocks_with_its_reason():
    text = SPLIT.replace("slice(%c) {axis=1, end=6, start=2}", "slice(%c) {axis=1, end=8, start=0, step=2}")
    g, a = analyzed(text)
    blocked = [gr for gr in a.groups_of_value("c") if gr.is_blocked]
    assert blocked and all(any("strided slice" in b.reason and b.node == "sl" for b in gr.blockers) for gr in blocked)
    assert len(blocked) == len(a.groups_of_value("c"))  # every channel of c is read by the strided slice or split


class Chunky(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.left = torch.nn.Conv2d(4, 4, 1)
        self.out = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        return self.out(torch.cat([torch.relu(self.left(a)), b], dim=1))


def test_torch_chunk_imports_as_split_and_prunes_exactly():
    torch.manual_seed(0)
    g = from_torch(Chunky().eval(), (torch.randn(1, 3, 8, 8),))
    a = analyze(g)
    split = next(n for n in g.nodes if n.op == "split")
    stem = a.groups_of_value(split.inputs[0])
    assert len(stem) == 2 and all(not gr.is_blocked for gr in stem)
    pruned = np.zeros(a.num_units, bool)
    pruned[a.unit_of[split.inputs[0]][[1, 5, 6]]] = True
    p = assert_zero_exact(g, a, pruned, batch=1)
    assert p.node(split.name).attrs["sizes"] == (3, 2)
