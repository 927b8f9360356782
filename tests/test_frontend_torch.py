"""torch.export frontend: one module per converter family, dynamic batch, the torchvision zoo vs eager, errors."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimc import interpreter, ir, ops
from slimc.errors import FrontendError
from slimc.frontend.torch import CONVERTERS, from_exported_program, from_torch, load_pt2, supported_ops
from slimc.ir import Graph


def assert_matches(outs: Sequence[np.ndarray], refs: Sequence[torch.Tensor], rel: float = 1e-4) -> None:
    """Max abs error within rel x (output range) for every output, shapes equal."""
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        r = r.detach().numpy()
        assert o.shape == r.shape, f"output {i}: IR shape {o.shape} vs torch {r.shape}"
        span = float(r.max() - r.min()) if r.size else 0.0
        err = float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.0
        assert err <= rel * max(span, 1e-3), f"output {i}: max abs error {err:.3g}, output range {span:.3g}"


def run_both(module: nn.Module, graph: Graph, inputs: Sequence[torch.Tensor]) -> None:
    """Run the IR interpreter and eager PyTorch on the same inputs and compare."""
    outs = interpreter.run(graph, [x.numpy() for x in inputs])
    with torch.no_grad():
        refs = module(*inputs)
    assert_matches(outs, refs if isinstance(refs, (tuple, list)) else (refs,))


def check(module: nn.Module, *inputs: torch.Tensor, expect_ops: Sequence[str] = (), dynamic_batch: bool = False,
          batches: Sequence[int] = ()) -> Graph:
    """Import, verify, compare with eager (also at other batch sizes when dynamic), check which IR ops appear."""
    torch.manual_seed(0)
    g = from_torch(module, inputs, dynamic_batch=dynamic_batch)
    g.verify()
    assert ir.parse_graph(str(g)) == g
    run_both(module, g, inputs)
    for b in batches:
        run_both(module, g, [torch.randn(b, *x.shape[1:]) for x in inputs])
    present = {n.op for n in g.nodes}
    missing = set(expect_ops) - present
    assert not missing, f"expected IR ops {sorted(missing)} in {sorted(present)}"
    return g


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial statistics/affine params so that mixing up BN operands changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) or type(m).__name__ == "LayerNorm2d":
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if hasattr(m, "layer_scale"):
                m.layer_scale.copy_(0.1 + 0.5 * torch.rand(m.layer_scale.shape, generator=gen))
    return model


def x4(n: int = 2, c: int = 4, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))


class Lambda(nn.Module):
    """A module whose forward is a function (keeps the per-converter tests one line each)."""

    def __init__(self, fn, *submodules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.subs = nn.ModuleList(submodules)

    def forward(self, *xs):
        return self.fn(self, *xs)


# ---- convolution, linear, matmul ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=(1, 2), bias=False),
    nn.Conv2d(4, 8, 3, padding=1, groups=4),
    nn.Conv2d(4, 6, 4, padding="same", dilation=1),
    nn.Conv2d(4, 6, 3, padding="valid"),
], ids=["plain", "strided_dilated", "depthwise", "same_even_kernel", "valid"])
def test_conv2d(conv: nn.Conv2d) -> None:
    g = check(conv, x4(), expect_ops=["conv2d"])
    assert "weight" in g.param_types or any(p.endswith("weight") for p in g.param_types)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_same_even_kernel_pads_bottom_right() -> None:
    g = from_torch(nn.Conv2d(4, 6, 4, padding="same"), (x4(),))
    (conv,) = [n for n in g.nodes if n.op == "conv2d"]
    assert conv.attrs["padding"] == (1, 1, 2, 2)


def test_linear_on_2d_and_4d_inputs() -> None:
    lin, flat = nn.Linear(8, 5), nn.Linear(96, 5, bias=False)
    g = check(Lambda(lambda s, x: (s.subs[0](x), s.subs[1](x.flatten(1))), lin, flat), x4(c=3, h=4, w=8),
              expect_ops=["dense", "flatten"])
    dense = [n for n in g.nodes if n.op == "dense"]
    assert [len(n.inputs) for n in dense] == [3, 2]
    assert dense[0].out_type.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(g.weights[dense[0].inputs[1]], lin.weight.detach().numpy())


def test_matmul_bmm_and_constant_right_operand_becomes_dense() -> None:
    w = nn.Parameter(torch.randn(6, 3))
    m = Lambda(lambda s, y: (y @ y.transpose(1, 2), torch.bmm(y, y.transpose(-1, -2)), y @ s.w))
    m.w = w
    g = check(m, torch.randn(2, 4, 6), expect_ops=["matmul", "dense", "transpose"])
    (dense,) = [n for n in g.nodes if n.op == "dense"]
    np.testing.assert_array_equal(g.weights[dense.inputs[1]], w.detach().numpy().T)


def test_core_aten_program_addmm_convolution_and_pool_indices() -> None:
    """A program already lowered to core ATen (convolution, addmm, max_pool2d_with_indices) imports too."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(36, 5)).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,)).run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.convolution.default", "aten.addmm.default", "aten.max_pool2d_with_indices.default"} <= targets
    g = from_exported_program(ep, name="core")
    g.verify()
    assert {"conv2d", "batch_norm", "max_pool2d", "dense"} <= {n.op for n in g.nodes}
    run_both(model, g, [x])


# ---- normalization -----------------------------------------------------------------------------------

def test_batch_norm_with_running_stats() -> None:
    bn = randomize_norms(nn.BatchNorm2d(4).eval())
    g = check(bn, x4(), expect_ops=["batch_norm"])
    (node,) = g.nodes
    scale, bias, mean, var = node.inputs[1:]
    np.testing.assert_array_equal(g.weights[mean], bn.running_mean.numpy())
    np.testing.assert_array_equal(g.weights[var], bn.running_var.numpy())
    np.testing.assert_array_equal(g.weights[scale], bn.weight.detach().numpy())
    assert {"weight", "bias", "running_mean", "running_var"} == {p.rsplit(".", 1)[-1] for p in node.inputs[1:]}


def test_batch_norm_without_affine() -> None:
    bn = nn.BatchNorm2d(4, affine=False).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    check(bn, x4(), expect_ops=["batch_norm"])


@pytest.mark.parametrize("shape,affine", [((8,), True), ((8, 8), True), ((8,), False)])
def test_layer_norm(shape: tuple[int, ...], affine: bool) -> None:
    ln = nn.LayerNorm(shape, elementwise_affine=affine)
    if affine:
        randomize_norms(ln)
    g = check(ln, x4(), expect_ops=["layer_norm"])
    (node,) = [n for n in g.nodes if n.op == "layer_norm"]
    assert node.attrs["axis"] == 4 - len(shape)


# ---- activations and elementwise ---------------------------------------------------------------------

@pytest.mark.parametrize("act,ir_op", [
    (nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.Hardtanh(0.0, 6.0), "relu6"), (nn.Hardtanh(-2.0, 2.0), "clip"),
    (nn.Hardswish(), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"), (nn.Sigmoid(), "sigmoid"),
    (nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu"), (nn.Tanh(), "tanh"),
    (nn.LeakyReLU(0.1), "relu"), (nn.Softmax(dim=1), "softmax"),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v)
def test_activation(act: nn.Module, ir_op: str) -> None:
    check(act, 3 * x4(), expect_ops=[ir_op])


def test_clamp_variants_pick_the_most_specific_op() -> None:
    m = Lambda(lambda s, x: (torch.clamp(x, 0, 6), torch.clamp(x, min=0), x.clamp_min(0.5), x.clamp_max(-0.5),
                             torch.clamp(x, -1.0, 1.0)))
    g = check(m, 4 * x4(), expect_ops=["relu6", "relu", "clip"])
    clips = sorted((n.attrs["min"] is None, n.attrs["max"] is None) for n in g.nodes if n.op == "clip")
    assert clips == [(False, False), (False, True), (True, False)]


def test_unary_math() -> None:
    m = Lambda(lambda s, x: (torch.exp(x), torch.sqrt(x * x + 1),
                             torch.erf(x), -x, torch.rsqrt(x * x + 1), torch.reciprocal(x * x + 1)))
    check(m, x4(), expect_ops=["exp", "sqrt", "erf", "neg", "pow", "div"])


def test_binary_ops_with_scalars_become_0d_params() -> None:
    m = Lambda(lambda s, x, y: (x + 1.5, x - 2, x * 3, x / 4, 1 - x, 2 ** (x / 8), x.pow(2), x + y, x - y, x * y,
                                x / (y * y + 1), torch.add(x, y, alpha=2), torch.sub(x, 1, alpha=3)))
    g = check(m, x4(), x4() + 0.5, expect_ops=["add", "sub", "mul", "div", "pow"])
    scalars = {name: float(arr) for name, arr in g.weights.items() if arr.shape == ()}
    assert scalars and all(g.param_types[n] == ir.TensorType((), "float32") for n in scalars)
    assert all("." in n for n in scalars)  # named NODE.SLOT, e.g. add.other
    assert any(n.endswith(".other") and v == 1.5 for n, v in scalars.items())


def test_broadcast_with_buffer_and_lifted_constant() -> None:
    m = Lambda(lambda s, x: x * s.k + s.c)
    m.register_buffer("k", torch.rand(4, 1, 1))
    m.c = torch.tensor(3.0)
    g = check(m, x4(), expect_ops=["mul", "add"])
    assert "k" in g.param_types and "c" in g.param_types


def test_constant_subexpressions_are_folded_into_params() -> None:
    m = Lambda(lambda s, x: x @ (s.w * 2).t() + torch.ones(5))
    m.w = nn.Parameter(torch.randn(5, 8))
    g = check(m, x4())
    # the weight transform and torch.ones are evaluated at import; no node computes on parameters alone
    params = set(g.param_types)
    assert all(not all(i in params for i in n.inputs) for n in g.nodes)


# ---- data movement -----------------------------------------------------------------------------------

def test_cat_split_chunk_getitem() -> None:
    m = Lambda(lambda s, x: (torch.cat([x, 2 * x], 1), *torch.split(x, 3, dim=1), *torch.chunk(x, 2, dim=-1),
                             *torch.split(x, [1, 3], dim=1)))
    g = check(m, x4(), expect_ops=["concat", "split"])
    sizes = sorted(n.attrs["sizes"] for n in g.nodes if n.op == "split")
    assert sizes == [(1, 3), (3, 1), (4, 4)]


def test_view_flatten_reshape_permute_transpose() -> None:
    m = Lambda(lambda s, x: (x.view(x.shape[0], -1), torch.flatten(x, 2), x.reshape(2, 2, 2, 64),
                             x.permute(0, 2, 3, 1).contiguous(), x.transpose(1, 3), x.unsqueeze(1).squeeze(1),
                             x[:, None]))
    g = check(m, x4(), expect_ops=["flatten", "reshape", "transpose", "identity"])
    perms = {n.attrs["perm"] for n in g.nodes if n.op == "transpose"}
    assert perms == {(0, 2, 3, 1), (0, 3, 2, 1)}


def test_slice_and_select() -> None:
    m = Lambda(lambda s, x: (x[:, 1:3], x[..., ::2], x[:, -1], x[:, :, 2:-1:3], x[:, 1]))
    g = check(m, x4(), expect_ops=["slice", "reshape"])
    assert all(n.attrs["start"] >= 0 and n.attrs["end"] >= n.attrs["start"] for n in g.nodes if n.op == "slice")


@pytest.mark.parametrize("fn,mode", [
    (lambda x: F.pad(x, (1, 2, 0, 1)), "constant"),
    (lambda x: F.pad(x, (1, 1, 2, 0), value=-1.5), "constant"),
    (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), "reflect"),
    (lambda x: F.pad(x, (2, 0, 0, 1), mode="replicate"), "edge"),
    (lambda x: nn.ZeroPad2d((0, 1, 1, 0))(x), "constant"),
], ids=["constant", "value", "reflect", "replicate", "zeropad"])
def test_pad(fn, mode: str) -> None:
    g = check(Lambda(lambda s, x: fn(x)), x4(), expect_ops=["pad"])
    assert [n.attrs["mode"] for n in g.nodes if n.op == "pad"] == [mode]


def test_channel_shuffle_module() -> None:
    check(nn.ChannelShuffle(2), x4(c=8), expect_ops=["channel_shuffle"])


# ---- pooling, reductions, resize ---------------------------------------------------------------------

def test_pools() -> None:
    m = Lambda(lambda s, x: (F.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 2, ceil_mode=True),
                             F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), F.avg_pool2d(x, 2),
                             F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, (2, 3))))
    check(m, x4(h=9, w=7), expect_ops=["max_pool2d", "avg_pool2d", "global_avg_pool", "adaptive_avg_pool2d"])


def test_means_and_sum() -> None:
    m = Lambda(lambda s, x: (x.mean([-1, -2], keepdim=True), x.mean([2, 3]), x.mean(-1), x.mean(),
                             x.sum(1), x.sum([2, 3], keepdim=True)))
    g = check(m, x4(), expect_ops=["global_avg_pool", "flatten", "mean", "mul"])
    assert sum(n.op == "global_avg_pool" for n in g.nodes) == 2


@pytest.mark.parametrize("fn", [
    lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    lambda x: F.interpolate(x, size=(5, 11), mode="nearest"),
    lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
    lambda x: F.interpolate(x, size=(13, 6), mode="bilinear", align_corners=True),
    lambda x: nn.Upsample(scale_factor=1.5)(x),
], ids=["nearest_x2", "nearest_size", "bilinear_x2", "bilinear_align_corners", "nearest_x1.5_exact"])
def test_resize(fn) -> None:
    check(Lambda(lambda s, x: fn(x)), x4(), expect_ops=["resize"])


def test_resize_scale_that_is_not_size_exact_is_an_error() -> None:
    with pytest.raises(FrontendError, match="scale factor"):
        from_torch(Lambda(lambda s, x: F.interpolate(x, scale_factor=1.3)), (x4(),))


def test_dropout_and_clone_are_identities() -> None:
    m = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(4, 4, 1), nn.Dropout2d(0.3))
    g = check(m, x4())
    assert {n.op for n in g.nodes} <= {"conv2d", "identity"}


# ---- dynamic batch, names, provenance ----------------------------------------------------------------

class ShuffleBlock(nn.Module):
    """ShuffleNet's channel shuffle written with view/transpose on x.size(0), plus a flattening head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        n, c, h, w = x.shape
        y = torch.relu(self.bn(self.conv(x)))
        y = y.view(n, 2, c, h, w).transpose(1, 2).contiguous().view(n, 2 * c, h, w)
        y = F.max_pool2d(y, 2)
        return self.fc(y.reshape(n, -1)), y.mean([2, 3]), torch.cat([y[:, :4], y[:, 4:]], dim=1)


def test_dynamic_batch_runs_at_batch_1_and_3() -> None:
    block = randomize_norms(ShuffleBlock().eval())
    g = check(block, x4(n=1), dynamic_batch=True, batches=[1, 3])
    assert g.inputs[0][1].shape == ("N", 4, 8, 8)
    assert all(t.shape[0] == "N" for n in g.nodes for t in n.out_types)


def test_saved_dynamic_batch_graph_loads_with_static_input_shapes(tmp_path) -> None:
    """`slimc compile saved.slimc --input-shape ...`: a graph saved with a symbolic batch gets static types."""
    from slimc.errors import ShapeError
    from slimc.models import load_model

    block = randomize_norms(ShuffleBlock().eval())
    g = from_torch(block, (x4(n=1),), dynamic_batch=True)
    ir.save(g, str(tmp_path / "g.slimc"))
    s = load_model(str(tmp_path / "g.slimc"), [(3, 4, 8, 8)]).graph
    assert s.inputs[0][1].shape == (3, 4, 8, 8) and all(t.is_static for n in s.nodes for t in n.out_types)
    x = x4(n=3).numpy()
    for a, b in zip(interpreter.run(s, [x]), interpreter.run(g, [x])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ShapeError, match=r"input %x.*--input-shape 3,5,8,8 does not fit"):
        load_model(str(tmp_path / "g.slimc"), [(3, 5, 8, 8)])


def test_static_batch_is_fixed() -> None:
    g = from_torch(ShuffleBlock().eval(), (x4(n=2),))
    assert g.inputs[0][1].shape == (2, 4, 8, 8)


def test_param_names_and_provenance() -> None:
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model.add_module("head", nn.Linear(4, 2))
    g = from_torch(Lambda(lambda s, x: s.subs[0].head(s.subs[0].stem(x).mean([2, 3])), model),
                   input_shapes=[(1, 3, 8, 8)], name="tiny net")
    assert g.name == "tiny_net"
    assert {"subs.0.stem.0.weight", "subs.0.stem.1.running_var", "subs.0.head.weight"} <= set(g.param_types)
    conv = next(n for n in g.nodes if n.op == "conv2d")
    assert conv.source == ("conv2d", "subs.0.stem.0")
    bn = next(n for n in g.nodes if n.op == "batch_norm")
    assert bn.name == "batch_norm" and bn.source[1] == "subs.0.stem.1"
    assert len({n.name for n in g.nodes}) == len(g.nodes)


def test_input_shapes_and_missing_inputs() -> None:
    g = from_torch(nn.Conv2d(3, 2, 1), input_shapes=[(2, 3, 5, 5)])
    assert g.inputs[0][1] == ir.TensorType((2, 3, 5, 5))
    with pytest.raises(FrontendError, match="example_inputs"):
        from_torch(nn.Conv2d(3, 2, 1))


# ---- errors ------------------------------------------------------------------------------------------

class Sorter(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values + 1


def test_unsupported_op_names_op_node_module_and_line() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Sorter())
    with pytest.raises(FrontendError) as info:
        from_torch(model, (torch.randn(1, 3, 4, 4),))
    msg = str(info.value)
    assert "aten.sort" in msg
    assert "fx node 'sort'" in msg
    assert "module '1' (Sorter)" in msg
    assert "test_frontend_torch.py" in msg and "torch.sort(x, dim=1)" in msg
    assert "Supported ATen ops:" in msg and "aten.conv2d.default" in msg
    assert "\n" not in msg


def test_fft_is_unsupported_too() -> None:
    with pytest.raises(FrontendError, match=r"aten\.fft_rfft.*fx node 'fft_rfft'"):
        from_torch(Lambda(lambda s, x: torch.fft.rfft(x).real), (x4(),))


def test_export_failure_becomes_frontend_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(FrontendError, match="torch.export could not capture DataDependent"):
        from_torch(DataDependent(), (x4(),))


def test_dynamic_batch_on_batch_specialized_model_is_explained() -> None:
    with pytest.raises(FrontendError, match="batch"):
        from_torch(Lambda(lambda s, x: x.view(2, -1)), (x4(n=2),), dynamic_batch=True)


def test_state_updates_in_forward_are_rejected() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count.add_(1)
            return x + self.count

    with pytest.raises(FrontendError, match="updates state"):
        from_torch(Counter(), (x4(),))


def test_training_only_constructs_and_casts_are_errors() -> None:
    with pytest.raises(FrontendError, match="dtype conversion"):
        from_torch(Lambda(lambda s, x: x.to(torch.float64) * 2), (x4(),))
    with pytest.raises(FrontendError, match="transposed convolution|aten.conv_transpose2d"):
        from_torch(nn.ConvTranspose2d(4, 2, 2), (x4(),))


# ---- .pt2 files --------------------------------------------------------------------------------------

def test_pt2_round_trip(tmp_path) -> None:
    model = randomize_norms(ShuffleBlock().eval())
    x = x4(n=2)
    path = tmp_path / "block.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    g = load_pt2(path)
    assert g.name == "block"
    g.verify()
    run_both(model, g, [x])


def test_pt2_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(FrontendError, match="no such file"):
        load_pt2(tmp_path / "nope.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(FrontendError, match="cannot read .*bad.pt2"):
        load_pt2(bad)
    with pytest.raises(FrontendError, match="ExportedProgram"):
        from_exported_program(nn.ReLU())  # type: ignore[arg-type]


# ---- the conversion table ----------------------------------------------------------------------------

ZOO_ATEN_OPS = [
    "aten._native_batch_norm_legit_no_training.default", "aten.adaptive_avg_pool2d.default", "aten.add.Tensor",
    "aten.avg_pool2d.default", "aten.cat.default", "aten.clone.default", "aten.conv2d.default",
    "aten.gelu.default", "aten.hardsigmoid.default", "aten.hardswish.default", "aten.hardtanh.default",
    "aten.layer_norm.default", "aten.linear.default", "aten.max_pool2d.default", "aten.mean.dim",
    "aten.mul.Tensor", "aten.permute.default", "aten.relu.default", "aten.sigmoid.default", "aten.silu.default",
    "aten.split.Tensor", "aten.transpose.int", "aten.view.default", "operator.getitem",
]


def test_table_covers_the_zoo_and_targets_are_overloads() -> None:
    assert set(ZOO_ATEN_OPS) <= set(supported_ops())
    for target in CONVERTERS:
        assert target is operator.getitem or isinstance(target, torch._ops.OpOverload), target
    assert {"conv2d", "dense", "batch_norm", "resize", "pad"} <= set(ops.OPS)


# ---- torchvision zoo ---------------------------------------------------------------------------------

ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
       "densenet121", "squeezenet1_1", "regnet_y_400mf", "convnext_tiny"]


def zoo_model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomize_norms(getattr(torchvision.models, name)().eval())


def check_zoo(name: str, size: int) -> None:
    model = zoo_model(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    g = from_torch(model, (x,), name=name)
    g.verify()
    out = interpreter.run(g, [x.numpy()])[0]
    with torch.no_grad():
        ref = model(x).numpy()
    span = float(ref.max() - ref.min())
    assert out.shape == ref.shape == (1, 1000)
    assert span > 1e-3, f"{name}: degenerate output range {span}"
    err = float(np.abs(out - ref).max())
    assert err <= 1e-4 * span, f"{name}: max abs error {err:.3g} vs output range {span:.3g}"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_matches_eager(name: str) -> None:
    check_zoo(name, 96)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_matches_eager_224(name: str) -> None:
    check_zoo(name, 224)


def test_zoo_dynamic_batch_shufflenet() -> None:
    """The channel shuffle's view(x.size(0), ...) traces through sym_size into a -1 reshape."""
    model = zoo_model("shufflenet_v2_x1_0")
    g = from_torch(model, (torch.randn(1, 3, 64, 64),), dynamic_batch=True)
    assert g.inputs[0][1].shape[0] == "N"
    for b in (1, 3):
        run_both(model, g, [torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(b))])
