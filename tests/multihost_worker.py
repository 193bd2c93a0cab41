"""Run by tests/test_multihost.py: ``python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID``.
Each process joins ``jax.distributed`` on localhost (CPU collectives over gloo), feeds its
share of every global batch from the per-process grain pipeline, and runs three sharded
train steps on a mesh over all processes' devices; prints the losses as JSON."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

port, nproc, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from starflow_jax.config import load_config, model_config  # noqa: E402
from starflow_jax.data.digits import load_digits_splits  # noqa: E402
from starflow_jax.data.pipeline import ArraySource, train_dataset  # noqa: E402
from starflow_jax.model import StarFlow  # noqa: E402
from starflow_jax.parallel.mesh import make_mesh  # noqa: E402
from starflow_jax.parallel.rules import batch_sharding, tree_shardings  # noqa: E402
from starflow_jax.train import optimizer  # noqa: E402
from starflow_jax.train import step as S  # noqa: E402


def main():
    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "tiny_cpu.py", ["model.channels=32"])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    tx = optimizer.adamw(optax.constant_schedule(1e-3), grad_clip=1.0)
    hp = S.StepConfig(noise_type="uniform", levels=17, num_classes=10, drop_label=0.1)
    state = S.init_state(model, tx, 0, ema=False)
    mesh = make_mesh({"data": -1})
    shard = tree_shardings(state, mesh)
    bshard = dict(image=batch_sharding(mesh, 4), label=batch_sharding(mesh, 1))
    state = jax.device_put(state, shard)
    step = jax.jit(
        functools.partial(S.train_step, graphdef=nnx.graphdef(model), tx=tx, hp=hp),
        in_shardings=(shard, bshard),
        out_shardings=(shard, None),
    )
    train, _ = load_digits_splits()
    it = iter(
        train_dataset(ArraySource(image=train.images, label=train.labels), global_batch=16, seed=0).to_iter_dataset()
    )
    losses = []
    for _ in range(3):
        local = next(it)
        batch = {k: jax.make_array_from_process_local_data(bshard[k], np.asarray(v)) for k, v in local.items()}
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    print(
        "LOSSES "
        + json.dumps(
            dict(process=jax.process_index(), count=jax.process_count(), devices=len(jax.devices()), losses=losses)
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
