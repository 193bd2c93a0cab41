"""Run by tests/test_finetune_sharded.py: ``python finetune_sharding_worker.py VAE_DIR`` on 4
CPU devices. Two fine-tuning steps of the tiny SD-VAE's decoder on one device, on a
``data=4`` mesh and on a ``data=2 x fsdp=2`` mesh, from the same state and batches; prints
the largest parameter / optimizer-state differences to the one-device run and how the
state's leaves are sharded as JSON."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from starflow_jax.autoencoders.finetune.trainer import Finetuner, check_finetune_mesh  # noqa: E402
from starflow_jax.autoencoders.loading import load_autoencoder  # noqa: E402
from starflow_jax.cli.finetune_decoder import load_finetune_config  # noqa: E402
from starflow_jax.parallel.mesh import make_mesh  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(vae_dir, mesh):
    config = load_finetune_config(
        ROOT / "configs" / "finetune_decoder_digits.py",
        ["finetune.batch_size=4", "finetune.image_size=16", "decoder_loss.discriminator_start=0"],
    )
    check_finetune_mesh(mesh, 4)
    tuner = Finetuner(
        load_autoencoder(vae_dir).model, config.finetune, config.decoder_loss, steps_per_epoch=1, mesh=mesh
    )
    state = tuner.init()
    start = jax.device_get(state.decoder)
    rng = np.random.default_rng(0)
    for _ in range(2):
        state, metrics = tuner.step(state, rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32))
    shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state)}
    big = max(jax.tree.leaves(state.decoder), key=lambda x: x.size)  # the largest trainable weight
    fsdp = lambda tree: sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(tree))  # noqa: E731
    sharded = dict(
        largest_spec=str(big.sharding.spec),
        largest_size=int(big.size),
        largest_shard_size=int(big.addressable_shards[0].data.size),
        decoder=fsdp(state.decoder),
        discriminator=fsdp(state.discriminator),
        opt_decoder=fsdp(state.opt_decoder),
        opt_discriminator=fsdp(state.opt_discriminator),
        frozen=fsdp(tuner.frozen),
    )
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return jax.device_get(state), metrics, shardings, start, sharded


def err(a, b) -> float:
    """The largest absolute difference between two trees of arrays."""
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main():
    vae_dir = sys.argv[1]
    want, want_m, _, start, _ = run(vae_dir, make_mesh((1, 1, 1), jax.devices()[:1]))
    report = dict(devices=jax.device_count(), meshes=[])
    for sizes in ({"data": 4}, {"data": 2, "fsdp": 2}):
        got, got_m, shardings, _, sharded = run(vae_dir, make_mesh(sizes))
        scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(want.decoder))
        report["meshes"].append(
            dict(
                mesh=sizes,
                decoder_err=err(got.decoder, want.decoder),
                discriminator_err=err(got.discriminator, want.discriminator),
                opt_err=err(got.opt_decoder, want.opt_decoder),
                opt_discriminator_err=err(got.opt_discriminator, want.opt_discriminator),
                moved=err(want.decoder, start),
                scale=scale,
                metrics_err=max(abs(got_m[k] - want_m[k]) / max(1.0, abs(want_m[k])) for k in want_m),
                state_specs=sorted(shardings),
                sharded=sharded,
            )
        )
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
