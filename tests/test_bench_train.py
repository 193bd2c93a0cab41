"""The training benchmark's pieces: the analytic FLOP count against the compiled
program's cost analysis, a program that does not grow with depth (scanned layers), and
the `bench train` command's JSON rows."""

import functools
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from starflow_jax.bench.flops import forward_flops, layer_flops, train_step_flops
from starflow_jax.cli.main import main
from starflow_jax.config import load_config, model_config
from starflow_jax.model import StarFlow
from starflow_jax.train import optimizer
from starflow_jax.train import step as S

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cost(compiled) -> float:
    ca = compiled.cost_analysis()
    return float((ca[0] if isinstance(ca, list) else ca)["flops"])


def test_analytic_flops_match_the_compiled_program():
    """With one layer per block (XLA's cost analysis counts a loop body once, whatever its
    trip count), the compiled forward pass's FLOPs are the analytic count (full attention
    square, as computed) plus a few percent of elementwise work."""
    cfg = model_config(load_config(ROOT / "configs" / "bench_s.py", ["model.layers_per_block=[1, 1, 1, 1]"]))
    model = StarFlow(cfg, rngs=nnx.Rngs(0))
    x, y = jnp.zeros((2, 4, 16, 16)), jnp.zeros((2, 8, 32))
    g, st = nnx.split(model)
    compiled = jax.jit(lambda st, x, y: nnx.merge(g, st)(x, y).z).lower(st, x, y).compile()
    ratio = _cost(compiled) / forward_flops(cfg, x.shape, causal_half=False)
    assert 1.0 <= ratio < 1.1, ratio
    # model FLOPs of a step: 3x the forward with causal attention at half
    assert train_step_flops(cfg, x.shape) == 3 * forward_flops(cfg, x.shape, causal_half=True)
    assert forward_flops(cfg, x.shape, causal_half=True) < forward_flops(cfg, x.shape, causal_half=False)


def test_matmul_floor_counts_what_the_compiled_chain_computes():
    """The matmul-only chain (``bench train --matmul-floor``): its analytic FLOPs are the
    compiled program's (no matmul shrunk by XLA), and they are the model's dense matmuls:
    the model's step FLOPs minus attention and the input / output / text projections."""
    from starflow_jax.bench import matmul_floor as M

    for overrides in ([], ["model.use_swiglu=True", "model.num_kv_heads=2"]):
        cfg = model_config(
            load_config(ROOT / "configs" / "bench_s.py", ["model.layers_per_block=[1, 1, 1, 1]", *overrides])
        )
        shapes = M.chain_shapes(cfg, (2, 4, 16, 16))
        compiled = M.chain_step().lower(M.init_chain(shapes, jnp.float32)).compile()
        assert abs(_cost(compiled) / M.chain_flops(shapes) - 1) < 0.01
        heads = cfg.channels // cfg.head_dim
        layers_only = sum(
            3
            * 2
            * layer_flops(
                264 if i == 3 else 256,
                256,
                heads,
                cfg.num_kv_heads or heads,
                cfg.head_dim,
                1024,
                cfg.use_swiglu,
                attended_pairs=0,
            )
            for i in range(4)
        )  # batch 2; the deep block reads 8 text tokens
        assert M.chain_flops(shapes) == layers_only
        assert M.chain_flops(shapes) < train_step_flops(cfg, (2, 4, 16, 16))


@pytest.mark.slow
def test_program_size_does_not_grow_with_depth():
    """A deep block of 2 or 24 scanned layers compiles to the same train-step program."""
    sizes = {}
    for depth in (2, 24):
        cfg = model_config(load_config(ROOT / "configs" / "tiny_cpu.py", [f"model.layers_per_block=[1, 0, {depth}]"]))
        model = StarFlow(cfg, rngs=nnx.Rngs(0))
        tx = optimizer.adamw(optax.constant_schedule(1e-3))
        state = S.init_state(model, tx, 0, ema=False)
        batch = dict(image=jnp.zeros((4, 1, 8, 8)), label=jnp.zeros((4,), jnp.int32))
        step = jax.jit(
            functools.partial(S.train_step, graphdef=nnx.graphdef(model), tx=tx, hp=S.StepConfig(num_classes=10))
        )
        sizes[depth] = len(step.lower(state, batch).compile().as_text())
    assert sizes[24] < 1.05 * sizes[2], sizes


def test_bench_train_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "train",
                "--config",
                str(ROOT / "configs" / "tiny_cpu.py"),
                "--batch",
                "4",
                "--steps",
                "1",
                "--peak-size",
                "256",
                "--matmul-floor",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["jax", "jax-matmuls"]
    floor = rows[1]
    # the dense matmuls are most of the model's FLOPs, never more
    assert 0.5 * rows[0]["flops_per_step"] < floor["flops_per_step"] < rows[0]["flops_per_step"]
    r = rows[0]
    assert {
        "impl",
        "dtype",
        "batch",
        "seconds_per_step",
        "tokens_per_s",
        "flops_per_step",
        "flops_per_s",
        "mfu",
    } <= set(r)
    assert r["batch"] == 4 and r["seconds_per_step"] > 0 and 0 < r["mfu"]
    assert abs(r["flops_per_s"] * r["seconds_per_step"] - r["flops_per_step"]) < 1e-6 * r["flops_per_step"]
    assert r["attention_kernel"] == {"tpu": "splash", "cpu": "per_head"}.get(jax.default_backend(), "xla")
    printed = capsys.readouterr().out
    assert "MFU" in printed and f"kernel {r['attention_kernel']}" in printed


def test_reference_runs_in_a_child_with_the_default_allocator(tmp_path, monkeypatch):
    """`--reference` rows come from a child process (`bench.common.reference_rows_in_child`)
    with STARFLOW_KEEP_HOST_MEMORY=0, so the reference is timed under glibc's defaults; the
    child rebuilds the same seeded setting. Checked without torch: a child that cannot
    import the reference fails, and the parent says which command failed."""
    from starflow_jax.bench import common

    seen = {}
    real_run = subprocess.run

    def spy(cmd, env=None, **kw):
        seen.update(cmd=cmd, env=env)
        return real_run(cmd, env=env, **kw)

    monkeypatch.setattr(common.subprocess, "run", spy)
    argv = [
        "bench",
        "train",
        "--config",
        str(ROOT / "configs" / "tiny_cpu.py"),
        "--batch",
        "2",
        "--steps",
        "1",
        "--reference",
        str(tmp_path / "no-checkout-here"),
    ]

    with pytest.raises(RuntimeError, match="timing the reference failed"):
        common.reference_rows_in_child(argv)
    assert seen["cmd"][-len(argv) :] == argv
    assert seen["env"]["STARFLOW_KEEP_HOST_MEMORY"] == "0" and seen["env"][common.REFERENCE_ROWS_ENV]
    assert common.REFERENCE_ROWS_ENV not in os.environ


@pytest.mark.skipif(
    not os.environ.get("STARFLOW_REFERENCE_REPO"),
    reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout",
)
def test_bench_train_with_the_reference(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "train",
                "--config",
                str(ROOT / "configs" / "tiny_cpu.py"),
                "--batch",
                "4",
                "--steps",
                "1",
                "--peak-size",
                "256",
                "--reference",
                os.environ["STARFLOW_REFERENCE_REPO"],
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["jax", "torch"]
    assert rows[1]["seconds_per_step"] > 0 and rows[1]["mfu"] > 0
