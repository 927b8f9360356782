"""ONNX frontend: each converter on hand-built graphs in several opsets vs onnxruntime, bad inputs, real models."""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimc import export, interpreter, ir
from slimc.errors import FrontendError
from slimc.frontend.onnx import TABLE, from_onnx, supported_ops

F = TensorProto.FLOAT


def rand(*shape: int, seed: int = 0, positive: bool = False) -> np.ndarray:
    a = np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.1 if positive else a


def vi(name: str, shape, elem: int = F) -> onnx.ValueInfoProto:
    """Typed value; an int shape means 'this rank, dims unknown'."""
    if isinstance(shape, int):
        shape = [f"{name}_d{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, elem, list(shape))


def make_model(nodes, inputs, outputs, inits=None, opset: int = 17, check: bool = True) -> onnx.ModelProto:
    """A model from nodes, (name, shape) inputs/outputs and numpy initializers; checked unless told not to."""
    graph = helper.make_graph(nodes, "t", [vi(n, s) for n, s in inputs], [vi(n, s) for n, s in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    opsets = [helper.make_opsetid("", opset)]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    if check:
        onnx.checker.check_model(m)
    return m


def ort_session(m: onnx.ModelProto | str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = m if isinstance(m, str) else m.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def ort_run(m: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(m).run(None, feeds)


def compare(m: onnx.ModelProto, feeds: dict[str, np.ndarray], input_shapes=None, rtol: float = 1e-5) -> ir.Graph:
    """Import, run in the interpreter and in onnxruntime, and require equal shapes and values."""
    g = from_onnx(m, input_shapes)
    names = [i.name for i in m.graph.input if i.name in feeds]
    ours = interpreter.run(g, [feeds[n] for n in names])
    theirs = ort_run(m, feeds)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        scale = float(np.abs(b).max()) if b.size else 1.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1.0))
    return g


def ops_of(g: ir.Graph) -> list[str]:
    return [n.op for n in g.nodes]


# ---- the table itself -----------------------------------------------------------------------------

def test_table_is_one_registry_covering_the_brief():
    required = {"Conv", "Gemm", "MatMul", "BatchNormalization", "Clip", "Split", "Slice", "Reshape", "Flatten",
                "Transpose", "Pad", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Softmax",
                "Resize", "Upsample", "LayerNormalization", "Gelu", "Erf", "HardSwish", "HardSigmoid", "Sigmoid",
                "Relu", "Tanh", "Add", "Sub", "Mul", "Div", "Pow", "Concat", "Identity", "Dropout", "Constant",
                "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "ConstantOfShape", "Range", "QuantizeLinear",
                "DequantizeLinear"}
    assert required <= set(supported_ops())
    assert all(rule.convert or rule.fold for rule in TABLE.values())


# ---- convolution and dense ------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("padding", [{"pads": [1, 0, 2, 1]}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"},
                                     {"auto_pad": "VALID"}, {}])
def test_conv(opset, padding):
    w, b = rand(6, 2, 3, 3), rand(6)
    dil = [1, 1] if padding.get("auto_pad", "").startswith("SAME") else [1, 2]  # ORT: no dilation with SAME_*
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 1], dilations=dil, **padding)
    m = make_model([node], [("x", [1, 4, 8, 10])], [("y", 4)], {"w": w, "b": b}, opset)  # H: odd SAME total
    g = compare(m, {"x": rand(1, 4, 8, 10)})
    assert ops_of(g) == ["conv2d"] and g.nodes[0].attrs["groups"] == 2


def test_conv_without_bias_and_names_are_sanitized():
    node = helper.make_node("Conv", ["input:0", "conv/w:0"], ["out/y:0"], name="block/conv 1", kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1])
    m = make_model([node], [("input:0", [1, 3, 6, 6])], [("out/y:0", 4)], {"conv/w:0": rand(5, 3, 3, 3)})
    g = compare(m, {"input:0": rand(1, 3, 6, 6)})
    assert g.input_names == ("input_0",) and "conv_w_0" in g.param_types and g.outputs == ("out_y_0",)
    assert g.nodes[0].source == ("block/conv 1", "Conv")
    g.verify()
    assert ir.parse_graph(ir.print_graph(g)) == g


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c_shape", [
    (0, 1, 1.0, 1.0, (5,)), (0, 0, 1.0, 1.0, (5,)), (1, 1, 0.5, 2.0, (1, 5)), (0, 0, 1.5, 1.0, ()),
    (0, 1, 1.0, 0.5, (3, 5)), (0, 1, 1.0, 1.0, None), (1, 0, 2.0, 0.0, (5,))])
def test_gemm_constant_weight_becomes_dense(opset, trans_a, trans_b, alpha, beta, c_shape):
    a_shape = (4, 3) if trans_a else (3, 4)
    b = rand(5, 4) if trans_b else rand(4, 5)
    inits = {"B": b}
    ins = ["A", "B"]
    if c_shape is not None:
        inits["C"] = rand(*c_shape) if c_shape else np.float32(0.7)
        ins.append("C")
    node = helper.make_node("Gemm", ins, ["Y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    m = make_model([node], [("A", a_shape)], [("Y", (3, 5))], inits, opset)
    g = compare(m, {"A": rand(*a_shape)})
    assert "dense" in ops_of(g) and "matmul" not in ops_of(g)
    dense = next(n for n in g.nodes if n.op == "dense")
    assert g.type_of(dense.inputs[1]).shape == (5, 4)  # [out, in]


@pytest.mark.parametrize("alpha,beta,with_c,trans_b", [(1.0, 1.0, True, 1), (1.0, 1.0, False, 0), (0.5, 3.0, True, 1),
                                                     (2.0, 1.0, False, 1)])
def test_gemm_runtime_weight(alpha, beta, with_c, trans_b):
    """A computed B becomes dense when alpha is 1 (QDQ models dequantize their weights), else matmul and mul."""
    ins = ["A", "B"] + (["C"] if with_c else [])
    node = helper.make_node("Gemm", ins, ["Y"], transB=trans_b, alpha=alpha, beta=beta)
    b_shape = (5, 4) if trans_b else (4, 5)
    inputs = [("A", (3, 4)), ("B", b_shape)] + ([("C", (3, 5))] if with_c else [])
    m = make_model([node], inputs, [("Y", (3, 5))])
    feeds = {"A": rand(3, 4), "B": rand(*b_shape), "C": rand(3, 5)}
    g = compare(m, {k: v for k, v in feeds.items() if k in ins})
    if alpha == 1.0:
        assert "dense" in ops_of(g) and "matmul" not in ops_of(g)
    else:
        assert "matmul" in ops_of(g) and "dense" not in ops_of(g)


def test_matmul_forms():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),          # constant 2-D weight -> dense
             helper.make_node("MatMul", ["h", "y"], ["z"]),          # both run-time -> matmul
             helper.make_node("MatMul", ["K", "z"], ["out"])]        # constant on the left -> matmul
    m = make_model(nodes, [("x", (2, 3, 4)), ("y", (2, 6, 5))], [("out", (2, 7, 5))],
                   {"W": rand(4, 6), "K": rand(7, 3)}, 13)
    g = compare(m, {"x": rand(2, 3, 4), "y": rand(2, 6, 5)})
    assert ops_of(g) == ["dense", "matmul", "matmul"]


@pytest.mark.parametrize("opset", [9, 11, 15])
def test_batch_norm(opset):
    c = 4
    inits = {"s": rand(c), "b": rand(c), "m": rand(c), "v": rand(c, positive=True)}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)
    m = make_model([node], [("x", (2, c, 3, 3))], [("y", (2, c, 3, 3))], inits, opset)
    g = compare(m, {"x": rand(2, c, 3, 3)})
    assert ops_of(g) == ["batch_norm"] and g.nodes[0].attrs["eps"] == pytest.approx(1e-3)


@pytest.mark.parametrize("opset", [17, 18])
def test_layer_norm(opset):
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["h"], epsilon=1e-6),
             helper.make_node("LayerNormalization", ["h", "s2"], ["y"], axis=2)]
    m = make_model(nodes, [("x", (2, 3, 4, 5))], [("y", (2, 3, 4, 5))],
                   {"s": rand(5), "b": rand(5), "s2": rand(4, 5)}, opset)
    g = compare(m, {"x": rand(2, 3, 4, 5)}, rtol=1e-4)
    assert ops_of(g) == ["layer_norm", "layer_norm"]


# ---- activations and elementwise ------------------------------------------------------------------

@pytest.mark.parametrize("opset", [10, 11, 13, 17])
@pytest.mark.parametrize("lo,hi,expected", [(0.0, 6.0, "relu6"), (0.0, None, "relu"), (0.0, np.inf, "relu"),
                                            (-1.0, 1.5, "clip"), (None, 2.0, "clip"), (None, None, "identity")])
def test_clip(opset, lo, hi, expected):
    if opset < 11:  # attribute form
        attrs = {k: float(v) for k, v in (("min", lo), ("max", hi)) if v is not None and not np.isinf(v)}
        node, inits = helper.make_node("Clip", ["x"], ["y"], **attrs), {}
    else:  # input form, absent bounds as empty names
        inits = {k: np.float32(v) for k, v in (("lo", lo), ("hi", hi)) if v is not None}
        node = helper.make_node("Clip", ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""],
                                ["y"])
    m = make_model([node], [("x", (2, 8))], [("y", (2, 8))], inits, opset)
    g = compare(m, {"x": 4 * rand(2, 8)})
    assert ops_of(g) == [expected]
    if expected == "clip":
        assert (g.nodes[0].attrs["min"], g.nodes[0].attrs["max"]) == (lo, hi)


@pytest.mark.parametrize("op_type,ir_op,attrs,opset", [
    ("Relu", "relu", {}, 13), ("Sigmoid", "sigmoid", {}, 13), ("Tanh", "tanh", {}, 13), ("Erf", "erf", {}, 13),
    ("Exp", "exp", {}, 13), ("Sqrt", "sqrt", {}, 13), ("Neg", "neg", {}, 13), ("HardSwish", "hardswish", {}, 14),
    ("HardSwish", "hardswish", {}, 21), ("HardSigmoid", "hardsigmoid", {"alpha": 0.3, "beta": 0.4}, 11),
    ("HardSigmoid", "hardsigmoid", {}, 17), ("Gelu", "gelu", {}, 20), ("Gelu", "gelu", {"approximate": "tanh"}, 21),
    ("Reciprocal", "div", {}, 13)])
def test_unary(op_type, ir_op, attrs, opset):
    m = make_model([helper.make_node(op_type, ["x"], ["y"], **attrs)], [("x", (2, 3, 5))], [("y", (2, 3, 5))],
                   opset=opset)
    positive = op_type in ("Sqrt", "Reciprocal")
    g = compare(m, {"x": 3 * rand(2, 3, 5, positive=positive)})
    assert ops_of(g) == [ir_op]
    if op_type == "HardSigmoid":
        assert g.nodes[0].attrs["alpha"] == pytest.approx(attrs.get("alpha", 0.2))


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_binary_with_constants_and_broadcasting(opset):
    nodes = [helper.make_node("Add", ["x", "c1"], ["a"]),        # channel-wise constant
             helper.make_node("Sub", ["c2", "a"], ["b"]),        # scalar constant on the left
             helper.make_node("Mul", ["b", "y"], ["c"]),         # run-time broadcasting
             helper.make_node("Div", ["c", "c3"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["e"]),       # an int64 exponent (opset 12+) is cast
             helper.make_node("Sum", ["e", "x", "c1"], ["f"])]
    inits = {"c1": rand(1, 3, 1, 1), "c2": np.float32(1.5), "c3": rand(4, positive=True),
             "two": np.int64(2) if opset >= 12 else np.float32(2)}
    m = make_model(nodes, [("x", (2, 3, 5, 4)), ("y", (1, 3, 1, 4))], [("f", (2, 3, 5, 4))], inits, opset)
    g = compare(m, {"x": rand(2, 3, 5, 4), "y": rand(1, 3, 1, 4)}, rtol=1e-4)
    assert ops_of(g) == ["add", "sub", "mul", "div", "pow", "add", "add"]


@pytest.mark.parametrize("opset,axis", [(11, 1), (11, -1), (11, 0), (11, None), (13, 1), (13, -1), (13, None)])
def test_softmax_old_and_new_semantics(opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    m = make_model([helper.make_node("Softmax", ["x"], ["y"], **attrs)], [("x", (2, 3, 4))], [("y", (2, 3, 4))],
                   opset=opset)
    g = compare(m, {"x": rand(2, 3, 4)})
    default = 1 if opset < 13 else -1
    coerced = opset < 13 and (default if axis is None else axis) % 3 != 2
    assert ops_of(g) == (["reshape", "softmax", "reshape"] if coerced else ["softmax"])


# ---- data movement --------------------------------------------------------------------------------

@pytest.mark.parametrize("opset,how,dim,outs,expected", [
    (11, {"split": [2, 3, 1]}, 6, 3, (2, 3, 1)),
    (13, {"input": [1, 5]}, 6, 2, (1, 5)),
    (13, {}, 6, 3, (2, 2, 2)),
    (18, {"num_outputs": 3}, 7, 3, (3, 3, 1)),
    (18, {"input": [4, 3]}, 7, 2, (4, 3))])
def test_split_forms(opset, how, dim, outs, expected):
    names = [f"y{i}" for i in range(outs)]
    inits = {}
    ins = ["x"]
    attrs = {"axis": 1}
    if "input" in how:
        inits["sizes"] = np.asarray(how["input"], np.int64)
        ins.append("sizes")
    attrs.update({k: v for k, v in how.items() if k != "input"})
    nodes = [helper.make_node("Split", ins, names, **attrs)] + [
        helper.make_node("Relu", [n], [f"r{i}"]) for i, n in enumerate(names)]
    m = make_model(nodes, [("x", (2, dim, 3))], [(f"r{i}", 3) for i in range(outs)], inits, opset)
    g = compare(m, {"x": rand(2, dim, 3)})
    split = next(n for n in g.nodes if n.op == "split")
    assert split.attrs["sizes"] == expected and len(g.outputs) == outs


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_slice_multi_axis_becomes_one_slice_per_axis(opset):
    x_shape = (2, 6, 7, 8)
    if opset < 10:
        node = helper.make_node("Slice", ["x"], ["y"], starts=[1, 0, -3], ends=[5, 100, 1000], axes=[1, 2, 3])
        inits = {}
    else:
        node = helper.make_node("Slice", ["x", "s", "e", "a", "k"], ["y"])
        inits = {"s": np.array([1, 0, -3], np.int64), "e": np.array([5, 2**62, 1000], np.int64),
                 "a": np.array([1, 2, -1], np.int64), "k": np.array([2, 1, 1], np.int64)}
    m = make_model([node], [("x", x_shape)], [("y", 4)], inits, opset)
    g = compare(m, {"x": rand(*x_shape)})
    assert ops_of(g) == ["slice", "slice"]  # axis 2 takes everything: no node
    assert [n.attrs["axis"] for n in g.nodes] == [1, 3]


def test_slice_without_axes_and_steps():
    node = helper.make_node("Slice", ["x", "s", "e"], ["y"])
    m = make_model([node], [("x", (4, 5))], [("y", 2)], {"s": np.array([1, -4], np.int64),
                                                         "e": np.array([-1, 4], np.int64)}, 13)
    compare(m, {"x": rand(4, 5)})


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_reshape_flatten_transpose_squeeze(opset):
    if opset >= 13:
        sq = helper.make_node("Squeeze", ["t", "ax1"], ["sq"])
        usq = helper.make_node("Unsqueeze", ["sq", "ax1"], ["usq"])
    else:
        sq = helper.make_node("Squeeze", ["t"], ["sq"], axes=[1])
        usq = helper.make_node("Unsqueeze", ["sq"], ["usq"], axes=[1])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),                  # [2,3,4,5] -> [2,-1,5] via 0
             helper.make_node("Transpose", ["r"], ["t0"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["t0", "shape2"], ["t"]),               # [2,5,12] -> [2,1,5,12]
             sq, usq,
             helper.make_node("Transpose", ["usq"], ["tt"]),                     # default: reversed axes
             helper.make_node("Flatten", ["tt"], ["f1"], axis=1),
             helper.make_node("Flatten", ["tt"], ["f0"], axis=0),
             helper.make_node("Flatten", ["tt"], ["f2"], axis=-2),
             helper.make_node("Flatten", ["tt"], ["f4"], axis=4)]
    inits = {"shape": np.array([0, -1, 5], np.int64), "shape2": np.array([2, 1, 5, 12], np.int64),
             "ax1": np.array([1], np.int64)}
    m = make_model(nodes, [("x", (2, 3, 4, 5))], [("f1", 2), ("f0", 2), ("f2", 2), ("f4", 2)], inits, opset)
    g = compare(m, {"x": rand(2, 3, 4, 5)})
    assert set(ops_of(g)) == {"reshape", "transpose", "flatten"}
    assert [g.type_of(o).shape for o in g.outputs] == [(12, 10), (1, 120), (60, 2), (120, 1)]


@pytest.mark.parametrize("opset,mode", [(10, "constant"), (11, "constant"), (11, "reflect"), (13, "edge"),
                                        (18, "constant"), (18, "reflect")])
def test_pad(opset, mode):
    pads = [0, 0, 1, 2, 0, 0, 2, 1]
    if opset < 11:
        node, inits = helper.make_node("Pad", ["x"], ["y"], pads=pads, value=1.5, mode=mode), {}
    elif opset >= 18:  # with the axes input
        inits = {"p": np.array([1, 2, 2, 1], np.int64), "ax": np.array([2, -1], np.int64)}
        ins = ["x", "p", "cv" if mode == "constant" else "", "ax"]
        if mode == "constant":
            inits["cv"] = np.float32(1.5)
        node = helper.make_node("Pad", ins, ["y"], mode=mode)
    else:
        inits = {"p": np.array(pads, np.int64)}
        ins = ["x", "p"] + (["cv"] if mode == "constant" else [])
        if mode == "constant":
            inits["cv"] = np.float32(1.5)
        node = helper.make_node("Pad", ins, ["y"], mode=mode)
    m = make_model([node], [("x", (1, 2, 4, 5))], [("y", (1, 2, 7, 8))], inits, opset)
    g = compare(m, {"x": rand(1, 2, 4, 5)})
    assert ops_of(g) == ["pad"] and g.nodes[0].attrs["pads"] == tuple(pads)


# ---- pooling, reductions --------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 17, 19])
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [0, 1, 1, 0]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [1, 1]}])
def test_max_pool(opset, attrs):
    m = make_model([helper.make_node("MaxPool", ["x"], ["y"], **attrs)], [("x", (1, 3, 9, 8))], [("y", 4)],
                   opset=opset)
    g = compare(m, {"x": rand(1, 3, 9, 8)})
    assert ops_of(g) == ["max_pool2d"]


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [0, 1, 1, 0], "count_include_pad": 1},
    {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}])
def test_avg_pool(opset, attrs):
    m = make_model([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], [("x", (1, 3, 9, 8))], [("y", 4)],
                   opset=opset)
    g = compare(m, {"x": rand(1, 3, 9, 8)})
    assert ops_of(g) == ["avg_pool2d"]
    assert g.nodes[0].attrs["count_include_pad"] == bool(attrs.get("count_include_pad", 0))


def test_global_pools():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["a"]), helper.make_node("GlobalMaxPool", ["x"], ["m"])]
    m = make_model(nodes, [("x", (2, 3, 5, 4))], [("a", (2, 3, 1, 1)), ("m", (2, 3, 1, 1))], opset=13)
    g = compare(m, {"x": rand(2, 3, 5, 4)})
    assert ops_of(g) == ["global_avg_pool", "max_pool2d"]


@pytest.mark.parametrize("opset,axes,keepdims,noop,expected", [
    (13, [2, 3], 1, 0, "global_avg_pool"), (13, [1], 0, 0, "mean"), (13, [-1, 1], 1, 0, "mean"),
    (18, [2, 3], 1, 0, "global_avg_pool"), (18, [1], 0, 0, "mean"), (18, None, 0, 0, "mean"),
    (18, None, 1, 1, "identity")])
def test_reduce_mean_attr_and_input_axes(opset, axes, keepdims, noop, expected):
    attrs = {"keepdims": keepdims}
    inits = {}
    ins = ["x"]
    if opset >= 18:
        if noop:
            attrs["noop_with_empty_axes"] = 1
        if axes is not None:
            inits["axes"] = np.array(axes, np.int64)
            ins.append("axes")
    elif axes is not None:
        attrs["axes"] = axes
    m = make_model([helper.make_node("ReduceMean", ins, ["y"], **attrs)], [("x", (2, 3, 4, 5))], [("y", 4 if
                   keepdims else 4 - len(axes or range(4)))], inits, opset)
    g = compare(m, {"x": rand(2, 3, 4, 5)})
    assert ops_of(g) == [expected]


# ---- resize ---------------------------------------------------------------------------------------

def _resize_model(opset: int, attrs: dict, scales=None, sizes=None, x_shape=(1, 2, 5, 6)) -> onnx.ModelProto:
    inits: dict[str, np.ndarray] = {}
    if opset < 11:
        ins = ["x", "scales"]
        inits["scales"] = np.asarray(scales, np.float32)
    elif opset < 13:  # roi and scales are required inputs; an empty scales tensor means "use sizes"
        ins = ["x", "roi", "scales"] + (["sizes"] if sizes is not None else [])
        inits["roi"] = np.zeros((0,), np.float32)
        inits["scales"] = np.asarray(scales if scales is not None else [], np.float32)
        if sizes is not None:
            inits["sizes"] = np.asarray(sizes, np.int64)
    else:
        ins = ["x", "", "", ""]
        if scales is not None:
            inits["scales"] = np.asarray(scales, np.float32)
            ins[2] = "scales"
        if sizes is not None:
            inits["sizes"] = np.asarray(sizes, np.int64)
            ins[3] = "sizes"
        while ins[-1] == "":
            ins.pop()
    node = helper.make_node("Resize", ins, ["y"], **attrs)
    return make_model([node], [("x", x_shape)], [("y", 4)], inits, opset)


@pytest.mark.parametrize("opset,attrs,scales,sizes,expected", [
    (10, {"mode": "nearest"}, [1, 1, 2, 2], None, ("nearest", False, (10, 12))),
    (11, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     [1, 1, 2, 3], None, ("nearest", False, (10, 18))),
    (13, {"mode": "nearest"}, [1, 1, 3, 3], None, ("nearest", False, (15, 18))),
    (13, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     None, [1, 2, 7, 4], ("nearest", False, (7, 4))),
    (13, {"mode": "linear"}, None, [1, 2, 13, 11], ("bilinear", False, (13, 11))),
    (13, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 2, 2], None,
     ("bilinear", False, (10, 12))),
    (13, {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [1, 2, 9, 3],
     ("bilinear", True, (9, 3))),
    (18, {"mode": "linear", "axes": [2, 3]}, None, [12, 14], ("bilinear", False, (12, 14))),
    (19, {"mode": "linear", "antialias": 1}, [1, 1, 2, 2], None, ("bilinear", False, (10, 12)))])
def test_resize(opset, attrs, scales, sizes, expected):
    m = _resize_model(opset, attrs, scales, sizes)
    g = compare(m, {"x": rand(1, 2, 5, 6)})
    assert ops_of(g) == ["resize"]
    a = g.nodes[0].attrs
    assert (a["mode"], a["align_corners"], a["size"]) == expected


def test_upsample_opset9():
    node = helper.make_node("Upsample", ["x", "s"], ["y"], mode="nearest")
    m = make_model([node], [("x", (1, 2, 3, 4))], [("y", (1, 2, 6, 12))],
                   {"s": np.array([1, 1, 2, 3], np.float32)}, 9)
    g = compare(m, {"x": rand(1, 2, 3, 4)})
    assert ops_of(g) == ["resize"] and g.nodes[0].attrs["size"] == (6, 12)


@pytest.mark.parametrize("attrs,scales,sizes,match", [
    ({"mode": "cubic"}, [1, 1, 2, 2], None, "cubic"),
    ({"mode": "nearest"}, None, [1, 2, 3, 4], "nearest_mode"),
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, [1, 1, 2, 2], None,
     "tf_crop_and_resize"),
    ({"mode": "linear"}, [1, 1, 1.5, 1.5], None, "non-integral")])
def test_resize_without_ir_equivalent_is_refused(attrs, scales, sizes, match):
    m = _resize_model(13, attrs, scales, sizes, x_shape=(1, 2, 5, 5))
    with pytest.raises(FrontendError, match=match):
        from_onnx(m)


def test_resize10_downscale_is_refused():
    with pytest.raises(FrontendError, match="Resize-10 downscaling"):
        from_onnx(_resize_model(10, {"mode": "nearest"}, [1, 1, 0.6, 0.6], x_shape=(1, 2, 5, 5)))


# ---- constants, identity, dropout, folding --------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13])
def test_concat_identity_dropout_constants(opset):
    dropout = (helper.make_node("Dropout", ["i", "ratio"], ["d"]) if opset >= 12
               else helper.make_node("Dropout", ["i"], ["d"], ratio=0.25))
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(rand(1, 2, 3), "cv")),
             helper.make_node("Constant", [], ["k"], value_float=0.5) if opset >= 12 else
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(0.5), "kv")),
             helper.make_node("Concat", ["x", "c", "x"], ["cat"], axis=1),
             helper.make_node("Mul", ["cat", "k"], ["m"]),
             helper.make_node("Identity", ["m"], ["i"]),
             dropout]
    inits = {"ratio": np.float32(0.25)} if opset >= 12 else {}
    m = make_model(nodes, [("x", (1, 3, 3))], [("d", (1, 8, 3))], inits, opset)
    g = compare(m, {"x": rand(1, 3, 3)})
    assert ops_of(g) == ["concat", "mul", "identity", "dropout"]
    assert g.nodes[-1].attrs["p"] == pytest.approx(0.25)


def test_shape_subgraph_is_folded():
    """Shape→Gather→Unsqueeze→Concat→Reshape and friends leave only the data ops in the IR."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Slice", ["s", "one", "big"], ["chw"]),
             helper.make_node("ReduceProd", ["chw"], ["flat"], keepdims=1),
             helper.make_node("Concat", ["n1", "flat"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("ConstantOfShape", ["n1"], ["ones"],
                              value=numpy_helper.from_array(np.array([1], np.int64), "v")),
             helper.make_node("Range", ["zero_s", "two_s", "one_s"], ["rng"]),
             helper.make_node("Cast", ["rng"], ["rngf"], to=F),
             helper.make_node("Equal", ["n", "zero_s"], ["is0"]),
             helper.make_node("Where", ["is0", "two_s", "one_s"], ["w"]),
             helper.make_node("Cast", ["w"], ["wf"], to=F),
             helper.make_node("ReduceSum", ["rngf"], ["sum"], keepdims=0),
             helper.make_node("Mul", ["r", "sum"], ["y0"]),
             helper.make_node("Add", ["y0", "wf"], ["y"])]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "one": np.array([1], np.int64),
             "big": np.array([2**62], np.int64), "zero_s": np.array(0, np.int64), "two_s": np.array(2, np.int64),
             "one_s": np.array(1, np.int64)}
    m = make_model(nodes, [("x", ["N", 3, 4, 5])], [("y", ["N", 60])], inits, 13)
    for batch in (1, 3):
        g = compare(m, {"x": rand(batch, 3, 4, 5)}, input_shapes={"x": (batch, 3, 4, 5)})
        assert ops_of(g) == ["reshape", "mul", "add"]
        assert g.inputs[0][1].shape == (batch, 3, 4, 5)


@pytest.mark.parametrize("indices,expected", [(np.array(2, np.int64), ["slice", "reshape"]),
                                              (np.array([1, 3, 5], np.int64), ["slice"]),
                                              (np.array([[0, 1], [2, 3]], np.int64), ["slice", "reshape"]),
                                              (np.arange(6, dtype=np.int64), ["identity"])])
def test_gather_on_runtime_tensor(indices, expected):
    m = make_model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [("x", (2, 6, 3))], [("y", 3)],
                   {"i": indices}, 13)
    g = compare(m, {"x": rand(2, 6, 3)})
    assert ops_of(g) == expected


def test_dead_nodes_are_dropped_and_symbolic_batch_defaults_to_one():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["unused"])]
    m = make_model(nodes, [("x", ["batch", 4])], [("y", ["batch", 4])], opset=13)
    g = from_onnx(m)
    assert ops_of(g) == ["relu"] and g.inputs[0][1].shape == (1, 4)


def test_output_without_declared_shape_is_accepted():
    """onnx.checker wants a shape on graph outputs; ONNX Runtime does not, nor does slimc."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "t", [vi("x", (1, 4))],
                              [helper.make_tensor_value_info("y", F, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(onnx.checker.ValidationError, match="shape"):
        onnx.checker.check_model(m)
    g = compare(m, {"x": rand(1, 4)})
    assert ops_of(g) == ["relu"] and not m.graph.output[0].type.tensor_type.HasField("shape")


def test_symbolic_spatial_dims_need_input_shapes():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", 3, "H", "W"])], [("y", 4)], opset=13)
    with pytest.raises(FrontendError, match=r"symbolic dim 2 \(H\).*input_shapes"):
        from_onnx(m)
    assert from_onnx(m, {"x": (2, 3, 7, 9)}).inputs[0][1].shape == (2, 3, 7, 9)
    assert from_onnx(m, [(1, 3, 5, 5)]).inputs[0][1].shape == (1, 3, 5, 5)
    assert from_onnx(m, (4, 3, 5, 5)).inputs[0][1].shape == (4, 3, 5, 5)


# ---- quantization ---------------------------------------------------------------------------------

U8, I8 = TensorProto.UINT8, TensorProto.INT8


def typed_model(nodes, inputs, outputs, inits=None, opset: int = 17) -> onnx.ModelProto:
    """Like make_model, with (name, shape, elem type) inputs and outputs."""
    graph = helper.make_graph(nodes, "t", [vi(n, s, e) for n, s, e in inputs], [vi(n, s, e) for n, s, e in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    opsets = [helper.make_opsetid("", opset)]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(m)
    return m


def quant_input(shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Random values (saturating some), with a third of them exact ties (k + 0.5) * scale for a power-of-two scale."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-300 * scale, 300 * scale, shape).astype(np.float32)
    ties = rng.random(shape) < 0.3
    x[ties] = ((rng.integers(-100, 100, int(ties.sum())) + 0.5) * scale).astype(np.float32)
    return x


@pytest.mark.parametrize("opset,scale,zp,axis", [
    (10, 0.25, np.uint8(100), None), (13, 0.25, np.int8(-3), None), (13, 0.125, None, None),
    (17, np.full(1, 0.25, np.float32), np.full(1, 7, np.uint8), None),  # a 1-element 1-D scale is per tensor
    (13, np.array([0.25, 0.5, 0.125], np.float32), np.array([0, 9, -9], np.int8), 1),
    (21, np.array([0.25, 0.5, 0.125, 1.0], np.float32), np.array([1, 2, 250, 128], np.uint8), -1)])
def test_quantize_dequantize_linear(opset, scale, zp, axis):
    """QuantizeLinear -> DequantizeLinear equal ONNX Runtime exactly: ties to even, saturation, per axis."""
    scale = np.asarray(scale, np.float32)
    inits = {"s": scale} | ({} if zp is None else {"z": np.asarray(zp)})
    qdq_in = ["s"] + ([] if zp is None else ["z"])
    attrs = {} if axis is None else {"axis": axis}
    q_elem = U8 if zp is None or np.asarray(zp).dtype == np.uint8 else I8
    nodes = [helper.make_node("QuantizeLinear", ["x", *qdq_in], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", *qdq_in], ["y"], **attrs)]
    shape = (2, 3, 5, 4)
    m = typed_model(nodes, [("x", shape, F)], [("q", shape, q_elem), ("y", shape, F)], inits, opset)
    x = quant_input(shape, float(scale.min()))
    g = compare(m, {"x": x}, rtol=0.0)
    assert ops_of(g) == ["quantize", "dequantize"]
    s_t, z_t = (g.type_of(v) for v in g.nodes[0].inputs[1:])
    assert s_t.shape == z_t.shape == (() if scale.size == 1 else (scale.size,))
    assert z_t.dtype == ("uint8" if q_elem == U8 else "int8")
    assert g.nodes[0].inputs[1:] == g.nodes[1].inputs[1:]  # the Q and its DQ share their parameters
    q = interpreter.run(g, [x])[0]
    lo, hi = (0, 255) if q_elem == U8 else (-128, 127)
    assert {lo, hi} <= set(np.unique(q).tolist())


def test_quantize_linear_output_dtype_without_zero_point():
    """Opset 21: without a zero point, output_dtype says the type (int8 here); the zero point is 0 of it."""
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=I8)
    m = typed_model([node], [("x", (2, 6), F)], [("q", (2, 6), I8)], {"s": np.float32(0.5)}, 21)
    g = compare(m, {"x": quant_input((2, 6), 0.5)}, rtol=0.0)
    assert g.type_of(g.nodes[0].inputs[2]).dtype == "int8"


def test_qdq_weights_and_int32_bias_fold_to_constants():
    """A float weight quantized in the graph becomes an int8 parameter behind a dequantize (what fold-qdq reads); the
    int32 bias dequantized with x_scale * w_scale folds into a float32 parameter."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    x_scale = np.float32(0.02)
    inits = {"w": w, "w_s": w_scale, "w_z": np.zeros(4, np.int8), "x_s": x_scale, "x_z": np.uint8(128),
             "b_q": rng.integers(-3000, 3000, 4).astype(np.int32), "b_s": (x_scale * w_scale).astype(np.float32),
             "b_z": np.zeros(4, np.int32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "w_s", "w_z"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w_s", "w_z"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], pads=[1, 1, 1, 1])]
    m = typed_model(nodes, [("x", (1, 3, 6, 6), F)], [("y", (1, 4, 6, 6), F)], inits, 13)
    g = compare(m, {"x": rand(1, 3, 6, 6)}, rtol=1e-5)
    assert ops_of(g) == ["quantize", "dequantize", "dequantize", "conv2d"]
    w_dq = g.producer(g.nodes[-1].inputs[1])
    assert w_dq.op == "dequantize" and w_dq.attrs["axis"] == 0 and g.weight(w_dq.inputs[0]).dtype == np.int8
    expected_wq = np.clip(np.rint(w / w_scale.reshape(4, 1, 1, 1)), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(g.weight(w_dq.inputs[0]), expected_wq)
    bias = g.weight(g.nodes[-1].inputs[2])
    np.testing.assert_array_equal(bias, inits["b_q"].astype(np.float32) * inits["b_s"])


@pytest.mark.parametrize("case,match", [
    ("runtime_scale", r"input 1 \(scale, 's'\) must be known at import time"),
    ("int16_zero_point", "zero point is int16; the IR quantizes to uint8, int8, uint16 only"),
    ("blocked", "blocked quantization"),
    ("float16_scale", "scale is float16"),
    ("runtime_int32", "dequantizing a run-time int32 tensor has no IR op")])
def test_unsupported_quantization_is_refused_naming_the_node(case, match):
    x = ("x", (2, 4), F)
    if case == "runtime_scale":
        m = typed_model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="qn")], [x, ("s", (), F)],
                        [("q", (2, 4), U8)])
    elif case == "int16_zero_point":
        m = typed_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="qn")], [x],
                        [("q", (2, 4), TensorProto.INT16)], {"s": np.float32(0.1), "z": np.int16(0)}, 21)
    elif case == "blocked":
        m = typed_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="qn", axis=1, block_size=2)],
                        [x], [("q", (2, 4), U8)],
                        {"s": np.full((2, 2), 0.1, np.float32), "z": np.zeros((2, 2), np.uint8)}, 21)
    elif case == "float16_scale":
        m = typed_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="qn")],
                        [("x", (2, 4), TensorProto.FLOAT16)], [("q", (2, 4), U8)],
                        {"s": np.float16(0.1), "z": np.uint8(0)}, 19)
    else:
        m = typed_model([helper.make_node("DequantizeLinear", ["x", "s"], ["y"], name="qn")],
                        [("x", (2, 4), TensorProto.INT32)], [("y", (2, 4), F)], {"s": np.float32(0.1)})
    with pytest.raises(FrontendError, match=match) as e:
        from_onnx(m)
    assert "'qn'" in str(e.value) and "\n" not in str(e.value)


def _ort_quantized_tiny_cnn(tmp_path) -> tuple[str, np.ndarray]:
    """tiny_models.convnet exported by slimc and quantized by ORT (static, QDQ, per-channel s8 weights, u8
    activations, min-max calibrated on 8 random inputs); returns its path and the scale of its output grid."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from tiny_models import convnet

    from slimc.frontend.torch import from_torch

    model = convnet()
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    export.to_onnx(from_torch(model, input_shapes=[model.slimc_input_shape]), fp32, opset=17)
    rng = np.random.default_rng(0)
    feeds = iter([{"x": rng.standard_normal(model.slimc_input_shape).astype(np.float32)} for _ in range(8)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    m = onnx.load(int8)
    last_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"][-1]
    assert last_q.output[0] in {i for n in m.graph.node if n.op_type == "DequantizeLinear" for i in n.input}
    scales = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return int8, scales[last_q.input[1]]


def test_ort_quantized_tiny_cnn_matches_onnxruntime(tmp_path):
    """ORT fuses the QDQ model into its own int8 kernels (QLinearConv, QGemm), whose requantization may round
    differently from the QDQ reference the interpreter computes; the logits must stay within one step of the
    output grid (on the machine this was written on, they are equal)."""
    path, step = _ort_quantized_tiny_cnn(tmp_path)
    g = from_onnx(path)
    ops = ops_of(g)
    assert ops.count("conv2d") == 3 and ops.count("quantize") >= 8
    conv_weights = [g.producer(n.inputs[1]) for n in g.nodes if n.op == "conv2d"]
    assert all(d.op == "dequantize" and g.weight(d.inputs[0]).dtype == np.int8 for d in conv_weights)
    rng = np.random.default_rng(1)
    xs = [2 * rng.standard_normal((1, 16, 16, 16)).astype(np.float32) for _ in range(10)]
    ours = np.stack([interpreter.run(g, [x])[0] for x in xs])
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        theirs = np.stack([sess.run(None, {"x": x})[0] for x in xs])
        diff = float(np.abs(ours - theirs).max())
        print(f"ORT {level.name}: max |slimc - ORT| = {diff:.6g} = {diff / step:.3g} output steps")
        assert diff <= step * (1 + 1e-5)
    assert len(np.unique(ours)) > 20  # the logits are not saturated


def test_ort_quantized_linear_head_folds_to_qdense(tmp_path):
    """ORT's QDQ Gemm reads a dequantized [out, in] weight; imported as dense, fold-qdq makes it a qdense."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from tiny_models import bn_net

    from slimc.frontend.torch import from_torch
    from slimc.pass_manager import PassManager

    model = bn_net()
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    export.to_onnx(from_torch(model, input_shapes=[model.slimc_input_shape]), fp32, opset=17)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(model.slimc_input_shape).astype(np.float32) for _ in range(8)]
    feeds = iter([{"x": x} for x in xs])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert "Gemm" in {n.op_type for n in onnx.load(int8).graph.node}
    g = from_onnx(int8)
    folded, _ = PassManager("fold-qdq").run(g)
    assert ops_of(folded).count("qdense") == 1 and "dense" not in ops_of(folded)
    for x in xs[:3]:
        np.testing.assert_allclose(interpreter.run(folded, [x])[0], interpreter.run(g, [x])[0], rtol=1e-5, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------------

def _tiny() -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv0")
    return make_model([node], [("x", (1, 3, 8, 8))], [("y", (1, 16, 6, 6))], {"w": rand(16, 3, 3, 3)})


def test_missing_file(tmp_path):
    with pytest.raises(FrontendError, match="no such file") as e:
        from_onnx(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(e.value)


def test_truncated_file(tmp_path):
    data = _tiny().SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FrontendError, match="cannot be decoded as an ONNX model") as e:
        from_onnx(p)
    assert "cut.onnx" in str(e.value) and "truncated" in str(e.value)


def test_not_an_onnx_file(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a protobuf\n" * 10)
    with pytest.raises(FrontendError, match="notes.onnx"):
        from_onnx(p)


def test_model_failing_checker(tmp_path):
    m = make_model([helper.make_node("Relu", ["nowhere"], ["y"], name="r0")], [("x", (1, 4))], [("y", (1, 4))],
                   check=False)
    p = tmp_path / "bad.onnx"
    onnx.save_model(m, p)
    with pytest.raises(FrontendError, match="fails onnx.checker") as e:
        from_onnx(p)
    assert "bad.onnx" in str(e.value) and "nowhere" in str(e.value)


def test_unknown_op_names_type_node_domain_and_lists_supported():
    m = make_model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Frobnicate", ["h"], ["y"], name="fx")],
                   [("x", (1, 4))], [("y", (1, 4))], check=False)
    with pytest.raises(FrontendError) as e:
        from_onnx(m)
    msg = str(e.value)
    assert "Frobnicate" in msg and "'fx'" in msg and "ai.onnx" in msg and "Supported ops:" in msg
    assert "Conv" in msg and "\n" not in msg


def test_custom_domain_op():
    node = helper.make_node("FusedThing", ["x"], ["y"], name="custom0", domain="com.example")
    g = helper.make_graph([node], "t", [vi("x", (1, 4))], [vi("y", (1, 4))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                          ir_version=8)
    with pytest.raises(FrontendError) as e:
        from_onnx(m)
    msg = str(e.value)
    assert all(s in msg for s in ("FusedThing", "custom0", "com.example", "custom domain", "Supported ops:"))


def test_opset_out_of_range():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", (1, 4))], [("y", (1, 4))], opset=22)
    with pytest.raises(FrontendError, match="opset 22"):
        from_onnx(m)


def _save_external(m: onnx.ModelProto, path: str, location: str) -> None:
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)


def _retarget_external(path: str, location: str) -> None:
    """Rewrite every external-data location of a saved model without touching the data."""
    m = onnx.load_model(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


def test_external_data_next_to_model_loads(tmp_path):
    m = _tiny()
    p = str(tmp_path / "ext.onnx")
    _save_external(m, p, "ext.weights")
    x = rand(1, 3, 8, 8)
    g = from_onnx(p)
    np.testing.assert_allclose(interpreter.run(g, [x])[0], ort_run(p, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert os.path.exists(tmp_path / "ext.weights") and "w" in g.param_types


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_model_dir_is_refused(tmp_path, where):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    p = str(model_dir / "m.onnx")
    _save_external(_tiny(), p, "w.bin")
    outside = tmp_path / "secret.bin"
    os.replace(model_dir / "w.bin", outside)  # the bytes are valid: a naive loader would read them
    if where == "dotdot":
        _retarget_external(p, "../secret.bin")
    elif where == "absolute":
        _retarget_external(p, str(outside))
    else:
        os.symlink(outside, model_dir / "link.bin")
        _retarget_external(p, "link.bin")
    with pytest.raises(FrontendError, match="outside the model's directory|absolute path") as e:
        from_onnx(p)
    assert "m.onnx" in str(e.value) and "initializer 'w'" in str(e.value)


def test_external_data_missing_file(tmp_path):
    p = str(tmp_path / "m.onnx")
    _save_external(_tiny(), p, "w.bin")
    os.remove(tmp_path / "w.bin")
    with pytest.raises(FrontendError, match="missing"):
        from_onnx(p)


def test_input_shape_errors():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    m = make_model(nodes, [("a", ["N", 3, 4]), ("b", ["N", 3, 4])], [("y", ["N", 3, 4])], opset=13)
    with pytest.raises(FrontendError, match=r"got 1 input shape\(s\) but the model has 2 input"):
        from_onnx(m, [(1, 3, 4)])
    with pytest.raises(FrontendError, match="rank 3"):
        from_onnx(m, [(1, 3, 4, 1), (1, 3, 4)])
    with pytest.raises(FrontendError, match="static dim 1 = 3"):
        from_onnx(m, {"a": (2, 5, 4), "b": (2, 3, 4)})
    with pytest.raises(FrontendError, match="'c'"):
        from_onnx(m, {"c": (2, 3, 4)})
    with pytest.raises(FrontendError, match="positive"):
        from_onnx(m, [(0, 3, 4), (1, 3, 4)])
    g = from_onnx(m, {"a": (2, 3, 4), "b": (2, 3, 4)})
    assert [t.shape for _, t in g.inputs] == [(2, 3, 4), (2, 3, 4)]


@pytest.mark.parametrize("nodes,inputs,inits,match", [
    ([helper.make_node("Conv", ["x", "w"], ["y"], name="c1d")], [("x", (1, 2, 9))], {"w": rand(3, 2, 3)},
     "2-D"),
    ([helper.make_node("Where", ["m", "x", "x"], ["y"], name="wh")], [("x", (2, 3)), ("m", (2, 3))], {},
     "computed at run time"),
    ([helper.make_node("Reshape", ["x", "x"], ["y"], name="rs")], [("x", (2, 3))], {}, "must be known at import"),
    ([helper.make_node("Gather", ["x", "i"], ["y"], name="ga")], [("x", (4, 3))],
     {"i": np.array([2, 0], np.int64)}, "arithmetic range"),
    ([helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2], name="mp"),
      helper.make_node("Cast", ["idx"], ["y2"], to=F)], [("x", (1, 1, 4, 4))], {}, "argmax indices")])
def test_unsupported_constructs_name_the_node(nodes, inputs, inits, match):
    elem = {"m": TensorProto.BOOL}
    graph = helper.make_graph(nodes, "t", [vi(n, s, elem.get(n, F)) for n, s in inputs],
                              [vi(o, 2) for o in nodes[-1].output],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(FrontendError, match=match) as e:
        from_onnx(m)
    assert f"'{nodes[0].name}'" in str(e.value)


# ---- torchvision models ---------------------------------------------------------------------------

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
          "densenet121", "squeezenet1_1", "regnet_y_400mf", "convnext_tiny"]
#: legacy TorchScript exporter (dynamo=False) at opsets 11/13/17, dynamo exporter at 18/20/21 (its native range)
TS_OPSETS = [11, 13, 17]
DYNAMO_OPSETS = [18, 20, 21]


def _export_torchvision(name: str, size: int, dynamo: bool, opset: int, path: str) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, opset_version=opset, input_names=["image"],
                          output_names=["logits"])


def _check_torchvision(name: str, size: int, dynamo: bool, opset: int, tmp_path) -> None:
    path = str(tmp_path / f"{name}.onnx")
    _export_torchvision(name, size, dynamo, opset, path)
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    ref = ort_run(path, {"image": x})[0]
    tol = 1e-4 * float(np.ptp(ref))
    g = from_onnx(path)
    g.verify()
    assert g.name == name and g.inputs[0][1].shape == (1, 3, size, size)
    ours = interpreter.run(g, [x])[0]
    assert ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) <= tol
    back = export.to_onnx(g, tmp_path / "back.onnx", opset=min(max(opset, 11), 21))
    again = ort_run(back, {g.input_names[0]: x})[0]
    assert float(np.abs(again - ref).max()) <= tol


def _model_params(size: int, marks=()) -> list:
    params = []
    for i, name in enumerate(MODELS):
        params.append(pytest.param(name, False, TS_OPSETS[i % 3], size, id=f"{name}-ts{TS_OPSETS[i % 3]}-{size}",
                                   marks=marks))
        params.append(pytest.param(name, True, DYNAMO_OPSETS[i % 3], size,
                                   id=f"{name}-dynamo{DYNAMO_OPSETS[i % 3]}-{size}", marks=marks))
    return params


@pytest.mark.parametrize("name,dynamo,opset,size", _model_params(96) + _model_params(224, pytest.mark.slow))
def test_torchvision_model(name, dynamo, opset, size, tmp_path):
    _check_torchvision(name, size, dynamo, opset, tmp_path)
