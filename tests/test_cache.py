"""Every cache slimc keeps (tuning databases, calibration, the arm64 rootfs) lives under one root."""

import os

from slimc.cache import cache_dir
from slimc.targets.qemu import rootfs_path
from slimc.targets.triple import resolve
from slimc.targets.tune import db_dir_for


def test_root_follows_slimc_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("tune") == str(tmp_path / "own" / "tune")
    monkeypatch.delenv("SLIMC_CACHE_DIR")
    assert cache_dir() == str(tmp_path / "xdg" / "slimc")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("x") == str(tmp_path / "home" / ".cache" / "slimc" / "x")


def test_tuning_databases_and_rootfs_share_the_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = str(tmp_path / "slimc")
    assert os.path.dirname(db_dir_for(resolve("native"))) == os.path.join(root, "tune")
    assert rootfs_path() == os.path.join(root, "arm64-rootfs")
