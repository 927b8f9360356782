"""AArch64 artifacts: cross-compile a tiny CNN, check the ELF, `slimc verify --qemu` it in the cached arm64 rootfs."""

import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EM_AARCH64 = 183
CROSS_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64-static", "debootstrap")

TINY_CNN = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    """A few convs, a depthwise conv, a residual add, pooling and a dense layer on 16x16 inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())
        self.pw = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = self.conv(self.pool(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_cnn():
    return TinyCNN().eval()
'''


def _missing_tools() -> list[str]:
    return [t for t in CROSS_TOOLS if shutil.which(t) is None and not os.access(f"/usr/sbin/{t}", os.X_OK)]


needs_cross_tools = pytest.mark.skipif(
    bool(_missing_tools()), reason=f"{', '.join(_missing_tools())} not installed: run `make cross-tools` "
                                   "(`make test` runs it first)")


def slimc(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimc.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=900)


def assert_clean_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("slimc: error: ")]
    assert len(err) == 1 and p.stderr.strip().endswith(err[0]), p.stderr  # one paragraph, last thing printed
    for n in needles:
        assert n in err[0], (n, err[0])


def elf_machine(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1, "not a 64-bit little-endian ELF"
    return struct.unpack_from("<H", head, 18)[0]


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory) -> str:
    """The tiny CNN cross-compiled for AArch64 with +neon,+dotprod and no tuning."""
    work = tmp_path_factory.mktemp("arm")
    (work / "tinycnn.py").write_text(TINY_CNN)
    out = str(work / "art")
    p = slimc("compile", "tinycnn:tiny_cnn", "--input-shape", "1,3,16,16", "--target", "aarch64-linux-gnu",
              "--mattr", "+neon,+dotprod", "--trials", "0", "--tune-db", str(work / "db"), "-o", out, cwd=str(work))
    assert p.returncode == 0, p.stderr
    assert "latency: not measured here" in p.stdout
    return out


def copy_artifact(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


@needs_cross_tools
def test_cross_compile_elf_and_verify_under_qemu(arm_artifact):
    assert elf_machine(os.path.join(arm_artifact, "model.so")) == EM_AARCH64
    p = slimc("verify", arm_artifact, "--qemu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "run on qemu-aarch64" in p.stdout and "OK: max error" in p.stdout
    assert "NOT latency" in p.stdout and "ms median" not in p.stdout
    max_rel = float(p.stdout.split("OK: max error ")[1].split()[0])
    assert max_rel <= 1e-4
    # without --qemu an AArch64 artifact cannot run here: say how to check it
    assert_clean_error(slimc("verify", arm_artifact), 2, "built for aarch64", "--qemu")


@needs_cross_tools
def test_verify_qemu_fails_on_corrupted_graph(arm_artifact, tmp_path):
    from slimc import ir

    art = copy_artifact(arm_artifact, tmp_path / "bad")
    path = os.path.join(art, "model.slimc")
    g = ir.load(path)
    name = next(k for k, w in g.weights.items() if w.ndim == 4)  # the first conv weight
    ir.save(g.with_nodes(g.nodes, {**g.weights, name: g.weights[name] * 1.5}), path)
    p = slimc("verify", art, "--qemu")
    assert "MISMATCH" in p.stdout
    assert_clean_error(p, 1, "differs from the IR interpreter", "model.slimc was changed", "rebuild")


@needs_cross_tools
def test_verify_qemu_fails_on_edited_check_outputs(arm_artifact, tmp_path):
    art = copy_artifact(arm_artifact, tmp_path / "edited")
    check = os.path.join(art, "check.npz")
    with np.load(check) as z:
        data = {k: z[k] for k in z.files}
    data["output0"] = data["output0"] + 1.0
    np.savez(check, **data)
    p = slimc("verify", art, "--qemu")
    assert_clean_error(p, 1, "saved in check.npz", "rebuild it")


def test_verify_host_artifact_natively(tmp_path):
    (tmp_path / "tinycnn.py").write_text(TINY_CNN)
    out = str(tmp_path / "x86")
    p = slimc("compile", "tinycnn:tiny_cnn", "--input-shape", "1,3,16,16", "--trials", "0", "--no-measure",
              "--tune-db", str(tmp_path / "db"), "-o", out, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    p = slimc("verify", out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "run on this machine" in p.stdout and "OK: max error" in p.stdout and "qemu" not in p.stdout
    assert_clean_error(slimc("verify", out, "--qemu"), 2, "--qemu runs AArch64 artifacts", "without --qemu")
    assert_clean_error(slimc("verify", str(tmp_path)), 2, "not a slimc artifact")


def test_rootfs_stamp_detects_partial_and_outdated(tmp_path, monkeypatch):
    import json

    from slimc.targets import qemu

    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path))
    root = qemu.rootfs_path()
    assert root == str(tmp_path / "arm64-rootfs")
    assert "does not exist" in qemu.rootfs_problem(root)
    os.makedirs(os.path.join(root, "usr", "bin"))
    assert "stamp" in qemu.rootfs_problem(root)  # an interrupted build never wrote its stamp
    stamp = dict(qemu.expected_stamp(), python="3.11")
    with open(os.path.join(root, qemu.STAMP_NAME), "w") as f:
        json.dump(stamp, f)
    assert "usr/bin/python3.11 is missing" in qemu.rootfs_problem(root)
    stamp["wheels"] = dict(stamp["wheels"], **{"apache-tvm": "0.1"})
    with open(os.path.join(root, qemu.STAMP_NAME), "w") as f:
        json.dump(stamp, f)
    assert "wheels" in qemu.rootfs_problem(root)


def test_rootfs_wheels_are_the_pinned_versions():
    from slimc.targets import qemu

    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    lower = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for name, version in qemu.wheel_pins().items():
        assert lower[name.lower().replace("_", "-")] == version, name


def test_missing_tools_name_the_make_target(monkeypatch):
    from slimc.targets import build, qemu

    monkeypatch.setattr(qemu, "_tool", lambda name: None)
    with pytest.raises(qemu.QemuError, match=r"make cross-tools"):
        qemu.qemu_binary()
    monkeypatch.setattr(build.shutil, "which", lambda name: None)

    class Arm:
        arch, triple = "aarch64", "aarch64-linux-gnu"

    with pytest.raises(build.BuildError, match=r"make cross-tools.*g\+\+-aarch64-linux-gnu"):
        build.export_library(object(), "/nonexistent/model.so", Arm())


# ---- int8 on +dotprod: qconv2d/qdense lowered to s8 x s8 -> s32 convs tensorized into sdot ------------------------

ARM_DOTPROD = ("aarch64-linux-gnu", None, "+neon,+dotprod")


def dot_shapes_net():
    """Every sdot layout case: 5 inputs (lane padding), 12/24 outputs (4- and 8-channel blocks), stride, dilation,
    zero points 0 and not, a 1x1 conv to 30 channels (output padding), a dense over 3 rows, 30 -> 10."""
    import torch
    from torch import nn

    class DotShapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(5, 12, 3, stride=2, padding=1)
            self.b = nn.Conv2d(12, 24, 3, padding=2, dilation=2)
            self.c = nn.Conv2d(24, 30, 1)
            self.fc = nn.Linear(30, 10)

        def forward(self, x):
            y = torch.relu(self.b(torch.relu(self.a(x))))
            return self.fc(self.c(y).mean((2, 3)))

    torch.manual_seed(0)
    return DotShapes().eval()


def int8_graph(model, x: np.ndarray, batch: int):
    """The model for `batch` rows, quantized with min-max ranges calibrated by hand on `x`, folded into integer ops."""
    import torch

    from slimc.frontend.torch import from_torch
    from slimc.pass_manager import PassManager
    from test_quant_pipeline import min_max_ranges

    g = from_torch(model, (torch.from_numpy(x[:batch]),), name="int8")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    g, _ = PassManager("quantize,fold-qdq").run(g.replace(calibration=min_max_ranges(g, x)))
    assert {n.op for n in g.nodes} >= {"qconv2d", "qdense"}
    return g


@pytest.fixture(scope="module")
def dot_shapes():
    x = (np.random.default_rng(0).standard_normal((6, 5, 12, 12)) + 0.7).astype(np.float32)
    return int8_graph(dot_shapes_net(), x, 3), x[:3]


def _dot_funcs(mod) -> list[str]:
    from slimc.targets.schedules import CONV_DOT_BLOCK

    return [gv.name_hint for gv in mod.functions if CONV_DOT_BLOCK in gv.name_hint]


def test_dotprod_lowering_is_exact_on_the_host(dot_shapes):
    """The s8 shift, bias correction and packed layouts, run natively (the sdot conv left unscheduled)."""
    import tvm
    from tvm import relax

    from slimc import interpreter
    from slimc.targets.lower import Lowerer, default_plan
    from slimc.targets.triple import resolve
    from slimc.targets.tune import prepare

    g, x = dot_shapes
    arm, host = resolve(*ARM_DOTPROD), resolve("native")
    mod = prepare(Lowerer(g, host.tvm(), default_plan(arm), arm).run(), host.tvm())
    assert len(_dot_funcs(mod)) == 4  # three convs and the dense
    vm = relax.VirtualMachine(tvm.compile(mod, host.tvm()), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), interpreter.run(g, [x])[0])


def test_dotprod_template_tensorizes_every_dot_conv_into_sdot(dot_shapes):
    import tvm

    from slimc.targets.lower import lower
    from slimc.targets.schedules import apply_templates
    from slimc.targets.triple import resolve
    from slimc.targets.tune import prepare

    g, _ = dot_shapes
    arm = resolve(*ARM_DOTPROD)
    mod = prepare(lower(g, arm), arm.tvm())
    dot = _dot_funcs(mod)
    mod, scheduled = apply_templates(mod, arm)
    assert len(dot) == 4 and set(dot) <= set(scheduled), (dot, scheduled)
    for name in dot:  # the 4x4 blocks became the intrinsic's LLVM call
        assert "call_llvm_pure_intrin" in mod[name].script(), name
    asm = tvm.compile(mod, arm.tvm()).mod.imports[0].inspect_source("s")
    assert len(re.findall(r"\ssdot\s", asm)) >= 4
    # without +dotprod the same graph keeps the generic integer kernels
    neon = resolve("aarch64-linux-gnu", None, "+neon")
    assert not _dot_funcs(prepare(lower(g, neon), neon.tvm()))


@pytest.fixture(scope="module")
def int8_arm_artifact(tmp_path_factory) -> str:
    """tiny_models.quant_net quantized by hand, cross-compiled for +neon,+dotprod with templates and no tuning."""
    import tiny_models
    import torch

    from slimc import interpreter
    from slimc.compile import compile_graph
    from slimc.models import LoadedModel
    from slimc.targets.triple import resolve

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).numpy()
    g = int8_graph(tiny_models.quant_net(), x, 1)
    work = tmp_path_factory.mktemp("arm-int8")
    loaded = LoadedModel("tiny_models:quant_net", g, lambda inputs: interpreter.run(g, list(inputs)), "slimc IR")
    result = compile_graph(loaded, "quantize,fold-qdq", g, [], target=resolve(*ARM_DOTPROD), mcpu=None, mattr=None,
                           trials=0, tune_db=str(work / "db"), tune_ops=None, measure=False, out_dir=str(work / "art"),
                           sample=[x[:1]], log=lambda msg: None)
    assert result.meta["target"]["int8_dot"] == "dotprod"
    return result.out_dir


@needs_cross_tools
def test_int8_dotprod_library_has_sdot_and_is_exact_under_qemu(int8_arm_artifact):
    from slimc.targets.asm import count_int8_dot
    from slimc.targets.triple import resolve

    lib = os.path.join(int8_arm_artifact, "model.so")
    assert elf_machine(lib) == EM_AARCH64
    counts = count_int8_dot(lib, resolve(*ARM_DOTPROD))  # aarch64-linux-gnu-objdump -d
    assert counts["sdot"] + counts["udot"] > 0, counts
    p = slimc("verify", int8_arm_artifact, "--qemu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "run on qemu-aarch64" in p.stdout
    # bit-exact: the integer kernels and the float epilogue round exactly as the IR interpreter does
    assert "max abs error 0.00e+00" in p.stdout and "OK: max error 0.00e+00" in p.stdout, p.stdout


def test_wide_layers_run_two_sdot_convs_and_are_exact_on_the_host(dot_shapes):
    """uint16 activations (quant-fallback{to=int16}) on +dotprod: one sdot conv per byte plane, exact."""
    import torch
    import tvm
    from tvm import relax

    from slimc import interpreter
    from slimc.frontend.torch import from_torch
    from slimc.pass_manager import PassManager
    from slimc.passes.quant.qdq import int8_nodes
    from slimc.passes.quant.wide import widen
    from slimc.targets.lower import Lowerer, default_plan, lower
    from slimc.targets.schedules import apply_templates
    from slimc.targets.triple import resolve
    from slimc.targets.tune import prepare
    from test_quant_pipeline import min_max_ranges

    _, x = dot_shapes
    g = from_torch(dot_shapes_net(), (torch.from_numpy(x),), name="wide")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    q, _ = PassManager("quantize").run(g.replace(calibration=min_max_ranges(g, x)))
    w, widened = widen(q, [n.name for n in int8_nodes(q)])
    folded, _ = PassManager("fold-qdq").run(w)
    wide = [n for n in folded.nodes if n.op in ("qconv2d", "qdense") and folded.type_of(n.inputs[0]).dtype == "uint16"]
    assert len(wide) == 4, widened  # every conv and the dense read 16 bits
    arm, host = resolve(*ARM_DOTPROD), resolve("native")
    mod = prepare(Lowerer(folded, host.tvm(), default_plan(arm), arm).run(), host.tvm())
    assert len(_dot_funcs(mod)) == 8  # two byte-plane convs each
    # convs whose channels need no lane padding (b: 12, c: 24) get both s8 byte planes from one kernel
    assert sum("byte_planes" in gv.name_hint for gv in mod.functions) == 2
    arm_mod = prepare(lower(folded, arm), arm.tvm())
    _, scheduled = apply_templates(arm_mod, arm)
    assert set(_dot_funcs(arm_mod)) <= set(scheduled)  # all tensorized into sdot
    vm = relax.VirtualMachine(tvm.compile(mod, host.tvm()), tvm.cpu())
    for inp in (x, x * 40):  # and far out of range: the grids' tops
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(inp)).numpy(), interpreter.run(folded, [inp])[0])
