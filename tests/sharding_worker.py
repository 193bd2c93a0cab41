"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices: one train
step on several meshes against one device; prints a JSON report."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from starflow_jax.config import load_config, model_config  # noqa: E402
from starflow_jax.model import StarFlow  # noqa: E402
from starflow_jax.parallel.mesh import make_mesh  # noqa: E402
from starflow_jax.parallel.rules import batch_sharding, tree_shardings  # noqa: E402
from starflow_jax.train import optimizer  # noqa: E402
from starflow_jax.train import step as S  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def main():
    root = pathlib.Path(__file__).resolve().parents[1]
    # widths divisible by the mesh axes, so that the rules really split
    config = load_config(root / "configs" / "tiny_cpu.py", ["model.channels=64", "model.head_dim=32"])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    tx = optimizer.adamw(optax.constant_schedule(1e-3), grad_clip=1.0)
    hp = S.StepConfig(noise_type="uniform", levels=17, num_classes=10, drop_label=0.1)
    state0 = S.init_state(model, tx, 0, ema=True)
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32), label=rng.integers(0, 10, 16).astype(np.int32)
    )
    fn = functools.partial(S.train_step, graphdef=graphdef, tx=tx, hp=hp)
    ref, ref_m = jax.jit(fn)(jax.device_put(state0, jax.devices()[0]), batch)
    report = {"devices": len(jax.devices()), "meshes": []}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        shard = tree_shardings(state0, mesh)
        bshard = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        step = jax.jit(fn, in_shardings=(shard, bshard), out_shardings=(shard, None))
        with jax.set_mesh(mesh):  # as the train loop runs it: activations constrained to the batch sharding
            new, m = step(jax.device_put(state0, shard), jax.device_put(batch, bshard))
        wrong = [
            jax.tree_util.keystr(p)
            for (p, leaf), want in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(shard))
            if hasattr(leaf, "sharding") and not leaf.sharding.is_equivalent_to(want, leaf.ndim)
        ]
        split = sum(1 for s in jax.tree.leaves(shard) if any(a is not None for a in s.spec))
        report["meshes"].append(
            dict(
                shape=shape,
                loss=float(m["loss"]),
                ref_loss=float(ref_m["loss"]),
                loss_err=rel(m["loss"], ref_m["loss"]),
                grad_norm_err=rel(m["grad_norm"], ref_m["grad_norm"]),
                params_err=max(rel(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params))),
                opt_err=max(rel(a, b) for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(ref.opt_state))),
                wrong_shardings=wrong,
                split_leaves=split,
            )
        )
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
