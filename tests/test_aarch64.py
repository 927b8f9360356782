"""AArch64 artifacts: cross-compile a tiny CNN, check the ELF, `slimc verify --qemu` it in the cached arm64 rootfs."""

import os
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
