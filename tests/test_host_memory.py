"""``keep_freed_host_memory``: a compiled program's per-execution temporaries stop
page-faulting once glibc keeps freed memory (counted in page faults, never in time)."""

import os
import subprocess
import sys

import pytest

from starflow_jax.parallel import host_memory

SCRIPT = r"""
import resource
from starflow_jax.parallel.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((1024, 4096), jnp.float32)  # 16 MB; the program's temporaries are several times that
f = jax.jit(lambda x: (jnp.sort(x * 2.0, axis=0) + jnp.cumsum(x, axis=1)).sum())
faults = []
for _ in range(12):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
# the fewest faults of one run after the heap settled: on some machines a run now and then
# faults again (the heap grows, or the host reclaims pages), which says nothing about the setting
print(applied, min(faults[2:]))
"""


def _faults_per_run(keep: bool) -> tuple[bool, float]:
    env = dict(os.environ, STARFLOW_KEEP_HOST_MEMORY="1" if keep else "0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.strip().splitlines()[-1].split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_removes_the_page_faults_of_each_execution():
    applied, kept = _faults_per_run(True)
    off, default = _faults_per_run(False)
    assert applied and not off
    # 4096 pages per 16 MB temporary: the default allocator faults them in on every run
    assert default > 4096, default
    assert kept < default / 10, (kept, default)


def test_opt_out_and_idempotence(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv("STARFLOW_KEEP_HOST_MEMORY", "0")
    assert host_memory.keep_freed_host_memory() is False
    monkeypatch.setenv("STARFLOW_KEEP_HOST_MEMORY", "1")
    assert host_memory.keep_freed_host_memory() is False  # decided once per process
