"""``train`` and ``plan`` build one program from one config (``train.program``): on 8
simulated CPU devices the step ``train`` runs and the step ``plan`` compiles take the same
state and batch (shapes, dtypes, shardings) and give the same new state. The compiled
program's FLOPs and collectives (``bench.hlo_stats``) count loop bodies per iteration."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow_jax.bench.hlo_stats import hlo_stats, roofline

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_plan_and_train_build_the_same_program():
    overrides = [
        "mesh.data=2",
        "mesh.fsdp=4",
        "train.batch_size=16",
        "train.grad_accum=2",
        "train.remat=full",
        "train.ema_decay=0.999",
        "train.steps=1",
        "sample.per_class=1",
    ]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(HERE / "program_worker.py"), str(HERE.parent / "configs" / "tiny_cpu.py"), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["devices"] == 8
    train, plan = report["train"], report["plan"]
    for part in ("state", "batch", "new_state"):
        assert train[part].keys() == plan[part].keys(), part
        for leaf in train[part]:
            assert train[part][leaf] == plan[part][leaf], (part, leaf)
    # the mesh and the FSDP split really are the config's, in both
    assert all(v["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} for v in train["state"].values())
    assert any("fsdp" in str(v["spec"]) for k, v in train["state"].items() if "opt_state" in k)
    assert any(k.startswith(".ema") for k in train["state"]) and train["batch"]["['image']"]["shape"][0] == 16


def _scan_program(devices):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices).reshape(len(devices)), ("f",))

    def loss(ws, x):
        x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)
        return x.sum()

    ws = jax.ShapeDtypeStruct((6, 128, 128), jnp.float32, sharding=NamedSharding(mesh, P(None, "f", None)))
    x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("f", None)))
    return jax.jit(jax.grad(loss)).lower(ws, x).compile()


def test_hlo_stats_count_every_iteration_of_a_scan():
    devices = jax.devices()
    n = len(devices)
    stats = hlo_stats(_scan_program(devices).as_text())
    # forward x @ w, backward dx and dw: three matmuls per layer, six layers, the batch split n ways
    assert stats.flops == pytest.approx(3 * 2 * 32 * 128 * 128 * 6 / n)
    assert stats.unknown_trip_counts == 0 and stats.bytes_accessed > 0
    if n > 1:  # per layer, the weights are gathered (forward and backward) and their gradient reduced
        assert stats.collective_count.get("all-gather", 0) >= 6
    # XLA's own count sees the loop body once
    bound = roofline(stats, stats.flops, "v5p")
    assert bound["bound_s"] == max(bound["compute_s"], bound["hbm_s"], bound["collective_s"]) > 0


def test_hlo_stats_read_multi_line_kernel_configs_and_conditions():
    text = """HloModule m

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p.1 = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8] get-tuple-element(%p.1), index=1
  %w = f32[8,8] constant({...})
  %k = f32[4,8] custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"kernel": "a
}} b"}
  %y = f32[4,8] dot(%k, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %t = (s32[], f32[4,8]) tuple(%i.1, %y)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8] parameter(0)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[4,8]) tuple(%z, %a)
  %w0 = (s32[], f32[4,8]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[4,8] get-tuple-element(%w0), index=1
}
"""
    stats = hlo_stats(text)
    assert stats.flops == 5 * 2 * 4 * 8 * 8 and stats.kernels == 5 and stats.unknown_trip_counts == 0


def test_bench_train_times_the_program_train_builds(monkeypatch, tmp_path):
    from starflow_jax.bench import train_bench
    from starflow_jax.cli.main import main
    from starflow_jax.train import program as P

    built = []

    def spy(config, mesh, num_classes):
        built.append(P.build_program(config, mesh, num_classes))
        return built[-1]

    monkeypatch.setattr(train_bench, "build_program", spy)
    config = str(HERE.parent / "configs" / "tiny_cpu.py")
    assert (
        main(
            [
                "bench",
                "train",
                "--config",
                config,
                "--batch",
                "2",
                "--steps",
                "1",
                "--peak-size",
                "128",
                "--remat",
                "full",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    (program,) = built
    # the config's model and the timed step's settings, through the builder train uses
    assert program.config.train.batch_size == 2 and program.hp.remat == "full" and program.hp.grad_clip == 1.0
    assert program.cfg.channels == 64 and json.loads((tmp_path / "b.json").read_text())[0]["remat"] == "full"
