"""Shared pieces of the benchmarks: timing, tables, JSON, benchmark weights."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.model import StarFlow


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """``(first_call_seconds, median_seconds_after, last_result)``; results are blocked on."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def bench_setting(config, key, default):
    """``config.bench[key]`` when the config has it, else ``default``."""
    return config.bench[key] if "bench" in config and key in config.bench else default


def benchmark_model(cfg: ModelConfig, seed: int, proj_out_std: float) -> StarFlow:
    """A random model whose blocks are all non-trivial (output projections not zero)."""
    model = StarFlow(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for i, block in enumerate(model.blocks):
        if hasattr(block, "proj_out"):
            k = block.proj_out.kernel
            k[...] = proj_out_std * jax.random.normal(jax.random.fold_in(key, i), k.shape, k.dtype)
    return model


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec)."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        cells = []
        for (k, _, fmt), w in zip(columns, widths):
            v = r.get(k)
            cells.append(("-" if v is None else format(v, fmt)).rjust(w))
        print("  ".join(cells))


def write_json(path: str | None, payload) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


# Set in the child process that times only the PyTorch reference (``reference_rows_in_child``):
# where it writes its rows.
REFERENCE_ROWS_ENV = "STARFLOW_BENCH_REFERENCE_ROWS"


def reference_child_output() -> str | None:
    """In the child of ``reference_rows_in_child``: the JSON path for its rows, else ``None``."""
    return os.environ.get(REFERENCE_ROWS_ENV) or None


def bench_argv(command: str, args, *extra: str) -> list[str]:
    """``bench <command> --config ... --set ...`` (the parsed ``args``' config and
    overrides) followed by ``extra``: the command line of the reference's child."""
    return [
        "bench",
        command,
        "--config",
        str(args.config),
        *[a for o in args.overrides for a in ("--set", o)],
        *extra,
        "--reference",
        args.reference,
    ]


def reference_rows_in_child(argv: Sequence[str]) -> list[dict]:
    """Time the reference in a child process, ``starflow-jax <argv>`` with the default
    glibc allocator: ``starflow-jax`` keeps freed host memory for XLA
    (``parallel.host_memory``), which slows PyTorch's multi-threaded allocations (its
    Jacobi sampling 1.2 -> 2.0 s at ``configs/bench_s.py``), so the reference never runs in
    the JAX process. The child rebuilds the same weights and inputs (seeded) and returns
    only the reference's rows."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "reference_rows.json")
        env = dict(os.environ, STARFLOW_KEEP_HOST_MEMORY="0", **{REFERENCE_ROWS_ENV: out})
        proc = subprocess.run([sys.executable, "-m", "starflow_jax.cli.main", *argv], env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"timing the reference failed (exit {proc.returncode}): starflow-jax {' '.join(argv)}")
        with open(out) as f:
            return json.load(f)
