"""Where slimc keeps what it can rebuild: tuning databases, calibration ranges, the arm64 rootfs, bench models."""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """$SLIMC_CACHE_DIR, else $XDG_CACHE_HOME/slimc, else ~/.cache/slimc; joined with `parts`."""
    root = os.environ.get("SLIMC_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "slimc")
    return os.path.join(root, *parts)
