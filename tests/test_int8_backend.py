"""int8 on the TVM backend: integer graphs lower to u8 x s8 -> s32 kernels, bit-exact against the IR interpreter."""

import numpy as np
import pytest
import torch

from slimc import interpreter
from slimc.frontend.torch import from_torch
from slimc.pass_manager import PassManager
from slimc.targets.triple import resolve

import tiny_models
from test_quant_pipeline import min_max_ranges

pytestmark = pytest.mark.backend


@pytest.fixture(scope="module")
def int8_graph():
    m = tiny_models.quant_net()
    x = torch.randn(8, 3, 32, 32).numpy()
    g = from_torch(m, (torch.from_numpy(x[:1]),), name="qnet")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    f, _ = PassManager("quantize,fold-qdq").run(g.replace(calibration=min_max_ranges(g, x)))
    return f, x[:1]


@pytest.fixture(scope="module")
def native_build(int8_graph):
    from slimc.targets.build import build

    return build(int8_graph[0], resolve("native"), trials=0, progress=False)


def _run(executable, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_int8_build_is_bit_exact(int8_graph, native_build):
    g, x = int8_graph
    np.testing.assert_array_equal(_run(native_build.executable, x), interpreter.run(g, [x])[0])


def test_build_maps_every_kernel_to_its_ir_nodes(int8_graph, native_build):
    """The kernel map names, in VM call order, the IR nodes each kernel computes; an integer conv's requantize and
    the residual add fused into it are in the conv's kernel."""
    import tvm
    from tvm import relax

    from slimc.targets.profile import kernel_kind, record_calls

    g, x = int8_graph
    kernels = native_build.kernels
    vm = relax.VirtualMachine(native_build.executable, tvm.cpu())
    calls, _ = record_calls(vm, tvm.cpu(), [tvm.runtime.tensor(x)])
    assert [k.symbol for k in kernels] == [symbol for symbol, _ in calls]
    names = [n.name for n in g.nodes]
    assert all(k.nodes for k in kernels) and all(n in names for k in kernels for n in k.nodes)
    assert all(list(k.nodes) == sorted(k.nodes, key=names.index) for k in kernels)
    convs = [k for k in kernels if "conv" in kernel_kind(k.symbol)]
    qconvs = [n.name for n in g.nodes if n.op == "qconv2d"]
    assert sorted(n for k in convs for n in k.nodes if n in qconvs) == sorted(qconvs)
    add = next(n.name for n in g.nodes if n.op == "qadd")
    assert any(add in k.nodes and len(k.nodes) > 1 for k in convs)


class _Residual24(torch.nn.Module):
    """A MobileNetV2-like 24-channel residual: 24 is no whole number of VNNI's 16-channel output blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, padding=1, stride=2)
        self.project = torch.nn.Conv2d(24, 24, 1)
        self.expand = torch.nn.Conv2d(24, 32, 1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        y = torch.relu(self.expand(a + self.project(a)))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.skipif(resolve("native").int8_dot != "vnni", reason="host CPU has no AVX-512 VNNI")
def test_int8_convs_read_a_padded_channel_block_as_it_is():
    """A VNNI conv writes 24 channels as two 16-channel blocks; the 1x1 convs and the residual add read that padding
    as it is (zero weights for it) instead of slicing to 24 channels and re-blocking: no layout or slice kernel
    between them, and the build still equals the integer IR bit for bit."""
    from slimc.targets.build import build
    from slimc.targets.profile import kernel_kind

    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    g = from_torch(_Residual24().eval(), (torch.from_numpy(x[:1]),), name="res24")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    f, _ = PassManager("quantize,fold-qdq").run(g.replace(calibration=min_max_ranges(g, x)))
    r = build(f, resolve("native"), trials=0, progress=False)
    np.testing.assert_array_equal(_run(r.executable, x[:1]), interpreter.run(f, [x[:1]])[0])
    convs = [n.name for n in f.nodes if n.op in ("qconv2d", "qadd")][1:]  # what reads the stem's 24 channels
    assert len(convs) == 3
    moves = [k for k in r.kernels if set(k.nodes) & set(convs)
             and (kernel_kind(k.symbol) == "layout transform" or "strided_slice" in k.symbol)]
    assert not moves, moves


def test_depthwise_padding_with_the_input_zero_point_is_bit_exact():
    """A depthwise conv pads inside its kernel with its input's zero point, here not 0 (no activation before it)."""
    x = np.random.default_rng(2).standard_normal((8, 3, 12, 12)).astype(np.float32)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                            torch.nn.Linear(16, 4)).eval()
    g = from_torch(m, (torch.from_numpy(x[:1]),), name="dwzp")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    f, _ = PassManager("quantize,fold-qdq").run(g.replace(calibration=min_max_ranges(g, x)))
    dw = [n for n in f.nodes if n.op == "qconv2d" and n.attrs["groups"] > 1]
    assert dw and dw[0].attrs.get("x_zero_point", 0) not in (0, 0.0)
    from slimc.targets.build import build

    for target in ("native", "x86-avx2"):
        r = build(f, resolve(target), trials=0, progress=False)
        np.testing.assert_array_equal(_run(r.executable, x[:1]), interpreter.run(f, [x[:1]])[0])


@pytest.mark.parametrize("act, bounds, out_scale, zp", [
    ("relu", {}, 1.0, 0), ("relu", {}, 1.0, 37), ("relu6", {}, 0.05, 3),
    ("clip", {"clip_min": -2.5, "clip_max": 70.3}, 1.0, 120), ("clip", {"clip_min": 300.0, "clip_max": 400.0}, 1.0, 0),
    ("clip", {"clip_min": -90.0, "clip_max": -20.0}, 0.5, 10), ("clip", {"clip_max": 2612.5952764079939}, 1.0, 0)])
def test_requantize_merges_the_activation_clamp_into_the_grid_clamp_exactly(act, bounds, out_scale, zp):
    """clip(round(clamp(y) / s) + zp, 0, 255) == clip(round(y / s) + zp, L, H) with L, H the clamp's images: the
    epilogue drops the activation's clamp; float32 throughout, as in the kernel, over values around every bound."""
    from slimc.targets.lower import clamp_bounds
    from slimc.targets.lower_quant import grid_clamp

    a = {"act": act, "out_scale": out_scale, "out_zero_point": zp, **bounds}
    lo_act, hi_act = clamp_bounds(act, a)
    y = np.concatenate([np.linspace(-500, 3000, 20001), *[v + np.linspace(-2, 2, 4001) for v in (lo_act, hi_act)
                                                         if v is not None]]).astype(np.float32)
    s, z = np.float32(out_scale), np.float32(zp)
    clamped = np.clip(y, np.float32(-np.inf if lo_act is None else lo_act),
                      np.float32(np.inf if hi_act is None else hi_act))
    old = np.clip(np.round(clamped / s if out_scale != 1.0 else clamped) + z, 0, 255)
    new = np.clip(np.round(y / s if out_scale != 1.0 else y) + z, *grid_clamp(a, (lo_act, hi_act), 0, 255))
    np.testing.assert_array_equal(old, new)


def test_generic_integer_kernels_without_vnni_are_bit_exact(int8_graph):
    from slimc.targets.build import build

    g, x = int8_graph
    r = build(g, resolve("x86-avx2"), trials=0, progress=False)
    np.testing.assert_array_equal(_run(r.executable, x), interpreter.run(g, [x])[0])


@pytest.mark.skipif(resolve("native").int8_dot != "vnni", reason="host CPU has no AVX-512 VNNI")
def test_vnni_kernels_are_in_the_library(native_build, tmp_path):
    from slimc.targets.asm import count_int8_dot

    lib = str(tmp_path / "m.so")
    native_build.executable.export_library(lib)
    counts = count_int8_dot(lib, resolve("native"))
    assert counts["vpdpbusd"] > 0, counts


def test_rounding_vectorizes():
    """`R.round` legalizes to `nearbyint`, which TVM 0.27's vectorizer scalarizes unless told it may vectorize it.

    Scalarized, a 16 x 16 requantizing tile compiled to 256 `vroundss` (a 1x1 int8 conv ran 5x slower).
    """
    import tvm
    from tvm import s_tir, te

    from slimc.targets.tune import vectorizable_rounding

    vectorizable_rounding()
    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: te.nearbyint(a[i] * 0.5), name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, 16])
    sch.vectorize(inner)
    lowered = s_tir.transform.LowerOpaqueBlock()(s_tir.transform.ConvertBlocksToOpaque()(sch.mod))
    text = tvm.tirx.transform.VectorizeLoop()(lowered).script()
    assert "T.nearbyint(a[T.Ramp(" in text, text  # scalarized, it is a serial loop over a[i * 16 + j]


def test_compile_int8_cli_reports_integer_kernels(tmp_path):
    import json

    from test_backend import slimc

    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "art"
    done = slimc("compile", "tiny_models:quant_net", "--int8", "--calib", str(calib), "--calib-method", "minmax",
                 "--no-measure", "-o", str(out))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert "calibrate{method=minmax},quantize" in meta["pipeline"] and meta["pipeline"].endswith(",fold-qdq")
    q = meta["quantization"]
    assert q["int8_mac_share"] == 1.0 and q["dequantize_ops"] == 0 and len(q["layer_sqnr_db"]) >= 5
    assert meta["check"]["max_rel"] == 0.0  # the artifact computes exactly what the integer IR computes
    if resolve("native").int8_dot == "vnni":
        assert q["int8_dot_instructions"]["vpdpbusd"] > 0
    assert "## int8" in (out / "report.md").read_text()
    prof = slimc("measure", str(out), "--profile", "--json", "--repeat", "3", "--number", "2")
    assert prof.returncode == 0, prof.stderr
    kinds = {k["kind"] for k in json.loads(prof.stdout)["kernels"]}
    if resolve("native").int8_dot == "vnni":  # every conv an int8 VNNI kernel, none in float
        assert "int8 conv (VNNI)" in kinds and "conv" not in kinds
    again = slimc("compile", str(out / "model.slimc"), "--no-measure", "-o", str(tmp_path / "again"))  # saved int8 IR
    assert again.returncode == 0, again.stderr
    q2 = json.loads((tmp_path / "again" / "meta.json").read_text())["quantization"]
    assert q2["int8_mac_share"] == 1.0 and q2["scheme"] is None and q2["int8_dot_instructions"] == q[
        "int8_dot_instructions"]
    assert "quantized before this pipeline" in (tmp_path / "again" / "report.md").read_text()
    missing = slimc("compile", "tiny_models:quant_net", "--int8", "--no-measure", "-o", str(tmp_path / "x"))
    assert missing.returncode != 0 and "--calib" in missing.stderr and not (tmp_path / "x").exists()


def test_compile_with_int16_fallback_reports_the_wide_layers(tmp_path):
    import json

    from test_backend import slimc

    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "art"
    done = slimc("compile", "tiny_models:quant_net", "--int8", "--calib", str(calib), "--calib-method", "minmax",
                 "--sqnr-floor", "200", "--fallback-to", "int16", "--no-measure", "-o", str(out))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert "quant-fallback{sqnr_floor=200.0,to=int16}" in meta["pipeline"]
    q = meta["quantization"]  # an unreachable floor: every layer reads int16 activations, none is float
    assert q["int16_mac_share"] > 0.99 and q["int16_layers"] and not q["float_layers"]
    assert meta["check"]["max_rel"] == 0.0
    assert "reading int16 activations" in (out / "report.md").read_text()


def test_compile_with_qat_fine_tunes_the_int8_model_on_data(tmp_path):
    """--qat learns from --train while the fallback budget is judged on the held-out --data."""
    import json

    from test_backend import slimc

    rng = np.random.default_rng(0)
    x, t = tmp_path / "x.npy", tmp_path / "t.npy"
    np.save(x, rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
    np.save(t, rng.standard_normal((48, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "art"
    done = slimc("compile", "tiny_models:quant_net", "--int8", "--calib", str(x), "--calib-method", "minmax",
                 "--max-drop", "1", "--qat", "1", "--train", str(t), "--data", str(x), "--no-measure", "-o", str(out))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert ",bias-correct,quant-fallback{max_drop=1.0},distill{epochs=1," in meta["pipeline"]
    assert meta["pipeline"].endswith(",fold-qdq")
    steps = {step["pass"].split("{")[0]: step["pass_stats"] for step in meta["passes"]}
    assert steps["distill"]["samples"] == 48 and steps["quant-fallback"]["budget"]["samples"] == 32
    assert "distill: epoch 1/1" in done.stderr  # progress of the fine-tuning
    assert meta["quantization"]["int8_mac_share"] == 1.0 and meta["check"]["max_rel"] == 0.0
    bad = slimc("compile", "tiny_models:quant_net", "--qat", "1", "--data", str(x), "--no-measure",
                "-o", str(tmp_path / "y"))
    assert bad.returncode != 0 and "--int8" in bad.stderr and not (tmp_path / "y").exists()


def test_pruning_composes_with_int8_in_one_pipeline():
    """prune (rounded to the target's block) -> calibrate -> quantize -> fold-qdq -> build, exact vs the IR."""
    from slimc.data import from_arrays
    from slimc.pass_manager import PassContext
    from slimc.targets.build import build

    m = tiny_models.quant_net()
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    g = from_torch(m, (torch.from_numpy(x[:1]),), name="qnet")
    target = resolve("native")
    pm = PassManager("canonicalize,fold-bn,prune{ratio=0.5,round_to=8},distill{epochs=2,batch_size=4,progress=false},"
                     "fuse-act,calibrate{method=minmax},quantize,fold-qdq",
                     context=PassContext(target=target, data=from_arrays([x]), sample_inputs=[x[:1]]))
    f, records = pm.run(g)
    steps = {r.name.split("{")[0]: r for r in records}
    assert steps["prune"].stats.macs < steps["fold-bn"].stats.macs * 0.8 and steps["distill"].changed
    assert steps["fold-qdq"].pass_stats["int8_mac_share"] == 1.0
    pruned = {n.name: f.weight(n.inputs[1]).shape[0] for n in f.nodes if n.op == "qconv2d"}
    assert any(c < 32 and c % 8 == 0 for c in pruned.values()), pruned
    r = build(f, target, trials=0, progress=False)
    np.testing.assert_array_equal(_run(r.executable, x[:1]), interpreter.run(f, [x[:1]])[0])

def test_global_average_pool_does_not_depend_on_the_summation_order():
    """A float pool feeding a requantize (MobileNetV2's head) must not move values across grid steps: both the
    interpreter and the backend sum float32 pools in float64."""
    import tvm
    from tvm import relax

    from slimc.targets.build import build

    x = np.random.default_rng(3).lognormal(0.0, 2.0, (1, 1280, 7, 7)).astype(np.float32)
    flat = x.reshape(1280, 49)
    forward = np.array([np.float32(sum(r, np.float32(0))) for r in flat])  # float32 sums in two orders differ
    backward = np.array([np.float32(sum(r[::-1], np.float32(0))) for r in flat])
    assert (forward != backward).any()
    g = from_torch(torch.nn.AdaptiveAvgPool2d(1), (torch.from_numpy(x),), name="gap")
    g, _ = PassManager("canonicalize").run(g)
    assert [n.op for n in g.nodes] == ["global_avg_pool"]
    ex = build(g, resolve("native"), trials=0, progress=False).executable
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, interpreter.run(g, [x])[0])
    np.testing.assert_array_equal(out.ravel(), flat.astype(np.float64).mean(1).astype(np.float32))
