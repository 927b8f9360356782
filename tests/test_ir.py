"""IR core: text round trip, verify, save/load, networkx view."""

import numpy as np
import pytest

from slimc import interpreter, ir, ops
from slimc.errors import IRError
from slimc.ir import Graph, TensorType

TEXT = """\
graph @tiny(%x: f32[N,3,8,8]) {
  param %w: f32[4,3,3,3]
  param %b: f32[4]
  param %fc.w: f32[2,16]
  %c: f32[N,4,8,8] = conv2d(%x, %w, %b) {act="relu", padding=[1,1,1,1]} loc("conv", "relu")
  %s#0: f32[N,2,8,8], %s#1: f32[N,2,8,8] = split(%c) {axis=1, sizes=[2,2]}
  %a: f32[N,2,8,8] = add(%s#0, %s#1)
  %p: f32[N,2,1,1] = global_avg_pool(%a)
  %r: f32[N,2] = flatten(%p)
  %m: f32[N,2] = clip(%r) {max=6.0, min=-1.5e-05}
  %f: f32[N,8,2] = reshape(%m) {shape=[-1,8,2]}
  return %m
}
"""


def test_reshape_symbolic_batch_is_rejected_when_batch_moves():
    with pytest.raises(IRError):
        ops.infer("reshape", [TensorType(("N", 2))], {"shape": (-1, 8, 2)})


def tiny() -> Graph:
    text = TEXT.replace('  %f: f32[N,8,2] = reshape(%m) {shape=[-1,8,2]}\n', "")
    g = ir.parse_graph(text)
    rng = np.random.default_rng(0)
    return g.replace(weights={k: rng.standard_normal(t.shape).astype("float32") for k, t in g.param_types.items()})


CALIBRATION = {"x": (-2.5, 3.0), "c": (0.0, 0.30000000000000004), "s#1": (-0.1, 7.25), "m": (-1.5e-05, 6.0)}


def calibrated() -> Graph:
    return tiny().replace(calibration=CALIBRATION)


@pytest.mark.parametrize("make", [tiny, calibrated])
def test_print_parse_round_trip(make):
    g = make()
    g.verify()
    text = ir.print_graph(g)
    assert ir.parse_graph(text) == g
    assert ir.print_graph(ir.parse_graph(text)) == text


def test_calibration_text_form_and_equality():
    g = calibrated()
    text = ir.print_graph(g)
    assert "  calib %s#1 [-0.1, 7.25]\n" in text and "  calib %c [0.0, 0.30000000000000004]\n" in text
    assert ir.parse_graph(text).calibration == CALIBRATION  # repr floats: bit-exact
    assert g != tiny()  # calibration is part of structural equality
    assert ir.print_graph(tiny().replace(calibration=dict(reversed(CALIBRATION.items())))) == text  # stable order
    with pytest.raises(IRError, match="line 13: expected 'calib %value"):
        ir.parse_graph(text.replace("[-0.1, 7.25]", "[-0.1]"))


@pytest.mark.parametrize("entry, message", [
    ({"nope": (0.0, 1.0)}, "not a value of the graph"),
    ({"w": (0.0, 1.0)}, "a parameter"),
    ({"c": (2.0, 1.0)}, "lo <= hi"),
    ({"c": (0.0, float("inf"))}, "finite bounds"),
])
def test_verify_checks_calibration_entries(entry, message):
    with pytest.raises(IRError, match=message):
        tiny().replace(calibration=entry).verify()


def test_calibration_follows_rebuilt_graphs():
    from slimc import rewrite

    g = calibrated()
    # with_nodes / replace keep the ranges of values that still exist and drop the others
    cut = g.with_nodes(g.nodes[:2], outputs=("s#1",))
    assert cut.calibration == {k: CALIBRATION[k] for k in ("x", "c", "s#1")}
    cut.verify()
    assert g.replace(nodes=g.nodes[:1], outputs=("c",)).calibration == {"x": (-2.5, 3.0), "c": CALIBRATION["c"]}
    assert g.replace(name="other").calibration == CALIBRATION
    # new weight data makes the ranges computed from it stale; attaching weights to a graph without them does not
    assert g.replace(weights={**g.weights, "b": g.weights["b"] + 1}).calibration == {"x": (-2.5, 3.0)}
    assert g.replace(weights=dict(g.weights)).calibration == CALIBRATION
    bare = ir.parse_graph(ir.print_graph(g))
    assert bare.replace(weights=g.weights).calibration == CALIBRATION
    assert g.with_nodes(g.nodes, {**g.weights, "w": -g.weights["w"]}).calibration == {"x": (-2.5, 3.0)}
    assert g.with_nodes(g.nodes, {**g.weights, "extra": np.ones(2, np.float32)}).calibration == CALIBRATION
    # renaming a value carries its range
    renamed = rewrite.rename_values(g, {"m": "out"})
    assert renamed.calibration["out"] == CALIBRATION["m"] and "m" not in renamed.calibration
    renamed.verify()


def test_edit_drops_ranges_of_values_it_may_change():
    from slimc.rewrite import Edit

    g = calibrated()
    # a replaced node (even under its old name) and everything downstream lose their range
    e = Edit(g)
    e.replace_node("a", e.make_node("a", "sub", ("s#0", "s#1")))
    out = e.apply()
    out.verify()
    assert out.calibration == {k: CALIBRATION[k] for k in ("x", "c", "s#1")}
    # a parameter with a new value invalidates every activation computed from it; graph inputs keep theirs
    e = Edit(g)
    e.set_param("w", np.zeros((4, 3, 3, 3), np.float32))
    assert e.apply().calibration == {"x": (-2.5, 3.0)}
    # removing a node whose uses were redirected to an untouched value keeps the ranges around it
    e = Edit(g)
    e.replace_uses("m", "r")
    e.remove_node("m")
    out = e.apply()
    out.verify()
    assert out.calibration == {k: CALIBRATION[k] for k in ("x", "c", "s#1")}
    assert Edit(g).apply().calibration == CALIBRATION


def test_verify_catches_wrong_type():
    g = tiny()
    bad = g.nodes[0].replace(out_types=(TensorType(("N", 5, 8, 8)),))
    with pytest.raises(IRError, match="node c"):
        g.with_nodes((bad,) + g.nodes[1:]).verify()


def test_verify_catches_use_before_def():
    g = tiny()
    with pytest.raises(IRError, match="not defined before use"):
        g.with_nodes((g.nodes[1], g.nodes[0]) + g.nodes[2:]).verify()


def test_unknown_op_and_attr():
    with pytest.raises(IRError, match="unknown op 'frobnicate'"):
        ops.infer("frobnicate", [], {})
    with pytest.raises(IRError, match="has no attribute"):
        ops.normalize_attrs("relu", {"alpha": 1.0})


@pytest.mark.parametrize("make", [tiny, calibrated])
def test_save_load(tmp_path, make):
    g = make()
    ir.save(g, tmp_path / "g.slimc")
    h = ir.load(tmp_path / "g.slimc")
    assert h == g and h.calibration == g.calibration
    x = interpreter.example_inputs(g, batch=2)
    np.testing.assert_array_equal(interpreter.run(g, x)[0], interpreter.run(h, x)[0])


def test_load_rejects_foreign_file(tmp_path):
    p = tmp_path / "junk.slimc"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(IRError, match="junk.slimc"):
        ir.load(p)


def test_networkx_view():
    g = tiny()
    nx_g = g.to_networkx()
    assert nx_g.nodes["c"]["op"] == "conv2d"
    assert nx_g.has_edge("s", "a") and nx_g.has_edge("x", "c")


def test_interpreter_runs_symbolic_batch():
    g = tiny()
    (y,) = interpreter.run(g, interpreter.example_inputs(g, batch=3))
    assert y.shape == (3, 2)
    assert y.max() <= 6.0


def test_interpreter_is_differentiable():
    import torch

    g = tiny()
    m = interpreter.GraphModule(g, trainable=True)
    x = torch.randn(2, 3, 8, 8)
    m(x).sum().backward()
    assert m.tensor("w").grad is not None and m.tensor("w").grad.abs().sum() > 0


def test_trainable_module_freezes_batch_norm_statistics():
    import torch

    g = ir.parse_graph("""\
graph @bn(%x: f32[2,4,3,3]) {
  param %g: f32[4]
  param %b: f32[4]
  param %m: f32[4]
  param %v: f32[4]
  %y: f32[2,4,3,3] = batch_norm(%x, %g, %b, %m, %v)
  return %y
}
""")
    g = g.replace(weights={k: np.ones(4, np.float32) for k in g.param_types})
    m = interpreter.GraphModule(g, trainable=True)
    m(torch.randn(2, 4, 3, 3)).sum().backward()
    assert m.tensor("g").grad is not None and m.tensor("b").grad is not None
    assert not m.tensor("m").requires_grad and not m.tensor("v").requires_grad
