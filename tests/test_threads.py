"""slimc runs TVM kernels on one thread per physical core, whatever TVM's SMT guess would give."""

import os
import subprocess
import sys

from slimc.threads import physical_cores

PROBE = "import slimc, tvm; print(tvm.runtime.num_threads())"


def _pool_size(env_threads: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    if env_threads is not None:
        env["TVM_NUM_THREADS"] = env_threads
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_physical_cores_is_within_the_affinity_mask():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_tvm_pool_uses_every_physical_core_by_default():
    # TVM alone would use hardware_concurrency / 2 on x86 (1 thread on a 2-core machine without SMT)
    assert _pool_size(None) == physical_cores()


def test_user_thread_count_wins():
    assert _pool_size("1") == 1
