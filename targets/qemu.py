"""Run cross-compiled AArch64 artifacts here: a cached arm64 Debian rootfs with the pinned TVM runtime, under qemu-user.

The rootfs is built once (debootstrap --foreign, `dpkg -x` of its debs, the aarch64 wheels of the host's pinned
apache-tvm/apache-tvm-ffi/numpy/ml_dtypes unzipped into site-packages) in a temp dir under slimc's cache dir,
stamped, and renamed into place, so a partial or outdated rootfs is detected and rebuilt. Runs use
`qemu-aarch64-static -L ROOTFS`, which needs no root and no binfmt. qemu timings are emulation speed, not latency.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from slimc.errors import SlimcError

ROOTFS_FORMAT = 1
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEB_PACKAGES = ("python3", "libstdc++6")
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions")
STAMP_NAME = ".slimc-rootfs.json"
QEMU_BINARIES = ("qemu-aarch64-static", "qemu-aarch64")
MAKE_HINT = ("run `make cross-tools` in the slimc checkout (it installs the Debian packages qemu-user-static, "
             "debootstrap and the aarch64 cross compiler)")

Log = Callable[[str], None]


class QemuError(SlimcError):
    """The arm64 rootfs could not be built or the artifact could not run under qemu-aarch64."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rootfs_path() -> str:
    """Where the arm64 rootfs lives: under slimc's cache dir, next to the tuning databases."""
    from slimc.cache import cache_dir

    return cache_dir("arm64-rootfs")


def _tool(name: str) -> str | None:
    """A host tool on PATH or in /usr/sbin (debootstrap lives there and non-root PATHs often lack it)."""
    found = shutil.which(name)
    if found:
        return found
    sbin = os.path.join("/usr/sbin", name)
    return sbin if os.access(sbin, os.X_OK) else None


def qemu_binary() -> str:
    """The qemu-user binary for AArch64 guests."""
    for name in QEMU_BINARIES:
        found = _tool(name)
        if found:
            return found
    raise QemuError(f"running AArch64 code here needs qemu-user ({QEMU_BINARIES[0]} on PATH) and it is missing; "
                    f"{MAKE_HINT}")


def wheel_pins() -> dict[str, str]:
    """The host's installed versions of the runtime wheels (the venv is installed from constraints.txt)."""
    pins = {}
    for name in WHEELS:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise QemuError(f"{name} is not installed in this Python ({sys.executable}), so slimc cannot tell which "
                            f"aarch64 wheel to put into the rootfs; install slimc with `make venv`") from None
    return pins


def expected_stamp() -> dict:
    """What a usable rootfs's stamp must say; any difference triggers a rebuild."""
    return {"format": ROOTFS_FORMAT, "suite": SUITE, "arch": "arm64", "packages": list(DEB_PACKAGES),
            "wheels": wheel_pins()}


def _site_packages(root: str, pyver: str) -> str:
    return os.path.join(root, "usr", "local", "lib", f"python{pyver}", "dist-packages")


def rootfs_problem(root: str) -> str | None:
    """Why the rootfs at `root` cannot be used as is (missing, partial, other versions), or None if it can."""
    stamp_path = os.path.join(root, STAMP_NAME)
    if not os.path.isdir(root):
        return "it does not exist yet"
    try:
        with open(stamp_path) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return "it has no valid version stamp: an interrupted or foreign build"
    want = expected_stamp()
    for key, value in want.items():
        if stamp.get(key) != value:
            return f"it was built with {key}={stamp.get(key)!r}, slimc now needs {value!r}"
    pyver = stamp.get("python", "")
    needed = [os.path.join(root, "usr", "bin", f"python{pyver}"),
              os.path.join(_site_packages(root, pyver), "tvm", "lib", "libtvm_runtime.so"),
              os.path.join(_site_packages(root, pyver), "numpy", "__init__.py")]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        return f"{os.path.relpath(missing[0], root)} is missing from it"
    return None


def ensure_rootfs(log: Log = _stderr) -> str:
    """Return the path of a usable arm64 rootfs, building it first when it is missing, partial or outdated."""
    root = rootfs_path()
    if rootfs_problem(root) is None:
        return root
    cache = os.path.dirname(root)
    try:
        os.makedirs(cache, exist_ok=True)
        lock = open(os.path.join(cache, "arm64-rootfs.lock"), "w")
    except OSError as e:
        raise QemuError(f"cannot create slimc's cache dir {cache}: {e.strerror}; set SLIMC_CACHE_DIR to a writable "
                        "directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now: wait for it
        problem = rootfs_problem(root)
        if problem is None:
            return root
        for stale in glob.glob(os.path.join(cache, ".arm64-rootfs.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
        log(f"slimc: building the arm64 rootfs for qemu checks in {root}, because {problem}; this happens once "
            "and takes about a minute")
        t0 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=".arm64-rootfs.tmp-", dir=cache)
        try:
            new_root = os.path.join(tmp, "root")
            _build(new_root, tmp, log)
            if os.path.exists(root):
                os.rename(root, os.path.join(tmp, "old"))
            os.rename(new_root, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"slimc: arm64 rootfs ready in {time.perf_counter() - t0:.0f} s ({_du_mb(root):.0f} MB)")
    return root


def _du_mb(path: str) -> float:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total / 2**20


def _run_logged(cmd: Sequence[str], log_path: str, what: str, timeout: float = 1800) -> None:
    """Run a build step with its output in a log file; on failure, quote the log's last line."""
    with open(log_path, "w") as out:
        try:
            p = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QemuError(f"{what} did not finish within {timeout:.0f} s; check the network to the Debian mirror "
                            "and PyPI and retry") from None
    if p.returncode != 0:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        last = lines[-1] if lines else "(no output)"
        raise QemuError(f"{what} failed (exit {p.returncode}): {last[:400]}. Nothing was installed; fix the cause "
                        "(network to the Debian mirror and PyPI, disk space) and rerun")


def _build(root: str, tmp: str, log: Log) -> None:
    """debootstrap the arm64 base, unpack its debs, add the pinned aarch64 wheels, stamp it."""
    debootstrap, dpkg = _tool("debootstrap"), _tool("dpkg")
    if debootstrap is None or dpkg is None:
        raise QemuError(f"building the arm64 rootfs needs debootstrap and dpkg and {'debootstrap' if dpkg else 'dpkg'} "
                        f"is missing; {MAKE_HINT}")
    qemu_binary()  # fail before the downloads when the rootfs could not run anyway
    if os.geteuid() != 0:
        raise QemuError("building the arm64 rootfs runs debootstrap, which needs root: run the command once as root "
                        "(e.g. `sudo env SLIMC_CACHE_DIR=$HOME/.cache/slimc slimc verify --qemu DIR`); later runs "
                        "need no root")
    pins = wheel_pins()
    mirror = os.environ.get("SLIMC_DEBIAN_MIRROR", DEFAULT_MIRROR)
    log(f"slimc:   debootstrap {SUITE} arm64 ({', '.join(DEB_PACKAGES)}) from {mirror}")
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    _run_logged([debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEB_PACKAGES)}",
                 *([f"--keyring={keyring}"] if os.path.isfile(keyring) else []), SUITE, root, mirror],
                os.path.join(tmp, "debootstrap.log"), "debootstrap of the arm64 rootfs")
    debs = sorted(glob.glob(os.path.join(root, "var", "cache", "apt", "archives", "*.deb")))
    log(f"slimc:   unpacking {len(debs)} arm64 packages")
    for deb in debs:  # no second stage: maintainer scripts would need the emulator and are not needed here
        _run_logged([dpkg, "-x", deb, root], os.path.join(tmp, "dpkg.log"), f"dpkg -x {os.path.basename(deb)}")
    glibc = next((m.group(1) for d in debs if (m := re.match(r"libc6_(\d+\.\d+)", os.path.basename(d)))), None)
    pythons = sorted(os.path.basename(p)[6:] for p in glob.glob(os.path.join(root, "usr", "bin", "python3.*"))
                     if re.fullmatch(r"python3\.\d+", os.path.basename(p)))
    if glibc is None or not pythons:
        raise QemuError(f"the {SUITE} arm64 rootfs came without libc6 or python3; check the mirror "
                        f"{mirror} (set SLIMC_DEBIAN_MIRROR to another Debian mirror)")
    pyver = pythons[-1]
    log(f"slimc:   downloading aarch64 wheels for Python {pyver}: "
        + ", ".join(f"{n}=={v}" for n, v in pins.items()))
    wheels = os.path.join(tmp, "wheels")
    major, minor = (int(x) for x in glibc.split("."))
    platforms = [f"manylinux_{major}_{m}_aarch64" for m in range(17, minor + 1)] + ["manylinux2014_aarch64"]
    _run_logged([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                 "--only-binary=:all:", "--dest", wheels, "--python-version", pyver, "--implementation", "cp",
                 *(a for p in platforms for a in ("--platform", p)), *(f"{n}=={v}" for n, v in pins.items())],
                os.path.join(tmp, "pip.log"), "pip download of the aarch64 wheels")
    site = _site_packages(root, pyver)
    os.makedirs(site, exist_ok=True)
    for whl in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        _unzip(whl, site)
    for deb in debs:
        os.remove(deb)  # ~60 MB the rootfs no longer needs
    shutil.rmtree(os.path.join(root, "debootstrap"), ignore_errors=True)
    # An empty ld.so.cache: without one the guest loader would read the host's (x86) cache through `-L`.
    open(os.path.join(root, "etc", "ld.so.cache"), "w").close()
    if sys.version_info[:2] == tuple(int(x) for x in pyver.split(".")):
        log("slimc:   precompiling Python bytecode on the host, so emulated runs need not compile it")
        stdlib = os.path.join(root, "usr", "lib", f"python{pyver}")
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", stdlib, site],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    stamp = dict(expected_stamp(), python=pyver, glibc=glibc, mirror=mirror, built=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(os.path.join(root, STAMP_NAME), "w") as f:  # written last: its presence marks a complete build
        json.dump(stamp, f, indent=2)


def _unzip(whl: str, dest: str) -> None:
    """Install a wheel by unzipping it (what pip does for these wheels: no scripts, no .data dirs), keeping modes."""
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            target = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(target, mode)


@dataclass(frozen=True)
class QemuRun:
    """Outputs of one emulated run and where the time went (emulation speed: never a latency figure)."""

    outputs: list[np.ndarray]
    wall_seconds: float
    import_seconds: float
    run_seconds: float
    guest_python: str
    guest_tvm: str


def run(lib_path: str, inputs: Sequence[np.ndarray], *, timeout: float = 900, log: Log = _stderr) -> QemuRun:
    """Run an AArch64 model.so on `inputs` under qemu-aarch64 in the arm64 rootfs; return its outputs."""
    qemu = qemu_binary()
    root = ensure_rootfs(log)
    with open(os.path.join(root, STAMP_NAME)) as f:
        pyver = json.load(f)["python"]
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qemu_runner.py")
    # A fresh host dir: its path does not exist in the rootfs, so `-L` leaves it alone and the guest sees it.
    with tempfile.TemporaryDirectory(prefix="slimc-qemu-") as tmp:
        shutil.copyfile(lib_path, os.path.join(tmp, "model.so"))
        shutil.copyfile(runner, os.path.join(tmp, "runner.py"))
        np.savez(os.path.join(tmp, "inputs.npz"), **{f"input{i}": np.asarray(x) for i, x in enumerate(inputs)})
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
               "TVM_USE_RUNTIME_LIB": "1"}  # the runtime library alone: what a device has, and 2x faster to load
        if os.environ.get("TVM_NUM_THREADS"):
            env["TVM_NUM_THREADS"] = os.environ["TVM_NUM_THREADS"]
        cmd = [qemu, "-L", root, "-cpu", "max", os.path.join(root, "usr", "bin", f"python{pyver}"),
               os.path.join(tmp, "runner.py"), os.path.join(tmp, "model.so"), os.path.join(tmp, "inputs.npz"),
               os.path.join(tmp, "outputs.npz")]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise QemuError(f"the emulated run of {lib_path} did not finish within {timeout:.0f} s under qemu-aarch64; "
                            "a large model may need longer (emulation is 10-50x slower than the real CPU)") from None
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {p.returncode}"
            raise QemuError(f"running {lib_path} under qemu-aarch64 in {root} failed: {last[:400]}. If the rootfs is "
                            f"broken, delete {root} and rerun to rebuild it; if the library is, rebuild the artifact")
        try:
            info = json.loads(p.stdout.strip().splitlines()[-1])
            with np.load(os.path.join(tmp, "outputs.npz")) as z:
                outputs = [z[f"output{i}"] for i in range(len(z.files))]
        except (OSError, ValueError, IndexError, KeyError) as e:
            raise QemuError(f"the emulated run of {lib_path} ended without readable outputs ({e}); delete {root} "
                            "and rerun to rebuild the rootfs") from None
    return QemuRun(outputs, wall, info["import_s"], info["run_s"], info["python"], info["tvm"])
