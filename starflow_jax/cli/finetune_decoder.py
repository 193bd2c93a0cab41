"""``starflow-jax finetune-decoder``: fine-tune the decoder of an SD-VAE (``AutoencoderKL``,
on images) or of the Wan video VAE (``AutoencoderKLWan``, on clips of ``finetune.frames``
frames: moving digits or a video folder), encoder frozen, to decode latents perturbed with
the flow's Gaussian noise; the result written as a diffusers directory ``WORKDIR/vae`` (of
the input's class) for ``starflow-jax sample --vae``. Metrics: ``WORKDIR/metrics.jsonl``
and ``WORKDIR/tensorboard``; orbax checkpoints in ``WORKDIR/checkpoints`` (rerun to resume).

Sharded like the flow's training: the config's ``mesh`` section (``config/training.py``'s
``mesh_section``; default: every device on ``data``) over all processes' devices, the global
batch split over ``data x fsdp``; with ``mesh.fsdp > 1`` the weights and both optimizer states
sharded over ``fsdp`` ZeRO-3 style (``trainer.fsdp_shardings``: the VAE and discriminator declare
no logical axes, so large arrays split along their largest divisible axis), checkpoints
restored with the same shardings (a run may resume on another mesh). With several processes
(``jax.distributed``: the same options as ``train``) each loads only its rows of every global
batch; process 0 writes the metrics and the result."""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np

from starflow_jax.cli import processes
from starflow_jax.config.loader import _load_python, apply_overrides
from starflow_jax.config.model_config import ConfigError


def add_parser(sub):
    p = sub.add_parser(
        "finetune-decoder",
        help="fine-tune an SD-VAE's or Wan VAE's decoder on noisy latents (the reference's finetune_decoder.py)",
    )
    p.add_argument(
        "--vae",
        required=True,
        help="diffusers AutoencoderKL (SD-VAE) or AutoencoderKLWan (Wan video VAE; DIR:SCALE for a temporal "
        "latent scale) directory to fine-tune",
    )
    p.add_argument("--config", required=True, help="config .py with finetune and decoder_loss sections")
    p.add_argument(
        "--workdir",
        required=True,
        help="new or empty directory (metrics.jsonl, checkpoints/, the fine-tuned vae/); one holding this "
        "command's checkpoints is resumed from its newest",
    )
    p.add_argument(
        "--stop-at", type=int, metavar="STEP", help="stop after this step, with a checkpoint (rerun to continue)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--lpips-vgg", help="torchvision VGG16 ImageNet weights (vgg16-397923af.pth)")
    p.add_argument("--lpips-heads", help="the lpips package's linear heads (vgg.pth)")
    p.add_argument("--convnext", help="torchvision ConvNeXt-S ImageNet weights (convnext_small-0c510722.pth)")
    p.add_argument(
        "--no-perceptual", action="store_true", help="train without the LPIPS / ConvNeXt-S term (no weights needed)"
    )
    processes.add_arguments(p)
    p.set_defaults(func=run)


def load_finetune_config(path: str, overrides=()):
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix != ".py":
        raise ConfigError(f"config file {p}: finetune-decoder takes a .py (ml-collections) config")
    config = _load_python(p, None)
    for section in ("finetune", "decoder_loss"):
        if section not in config:
            raise ConfigError(f"config {p} has no {section!r} section")
    if "mesh" not in config:  # optional: the training mesh's defaults (every device on data)
        from starflow_jax.config.training import mesh_section

        config.mesh = mesh_section()
    config.lock()
    return apply_overrides(config, overrides)


def digits_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """The digits ``(n, 1, 8, 8)`` in [-1, 1] upscaled (nearest) to ``(n, 3, size, size)``."""
    from starflow_jax.data.digits import digits_at

    return np.repeat(digits_at(images, size, 1), 3, axis=1)


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The training indices of ``step``'s batch: epoch ``e = step // (n // batch_size)`` walks
    a permutation drawn from ``(seed, e)`` (a function of the step alone, so a resumed run
    sees the same data)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch_size : (i + 1) * batch_size]


def moving_digits_rgb(source, idx, size: int) -> np.ndarray:
    """Clips ``idx`` of a ``MovingDigitsSource`` upscaled (nearest) to ``(b, t, 3, size, size)``."""
    clips = np.stack([source[int(i)]["image"] for i in idx])  # (b, t, 1, 8, 8)
    b, t = clips.shape[:2]
    return digits_rgb(clips.reshape((b * t,) + clips.shape[2:]), size).reshape(b, t, 3, size, size)


def training_clips(f):
    """``(n_train, batch of indices -> clips, held-out clips)``, clips ``(b, frames, 3, s, s)``
    in [-1, 1]: ``f.videos``, a video folder (``VideoFolderSource``; held out: the first
    ``heldout_images`` videos of a fixed permutation), or moving digits (the digits' train
    split, held out: clips of the held-out split)."""
    if not f.videos:
        from starflow_jax.data.digits import load_digits_splits
        from starflow_jax.data.moving_digits import MovingDigitsSource

        train_split, held_split = load_digits_splits(f.num_train, seed=0)
        train = MovingDigitsSource(train_split.images, train_split.labels, f.frames, seed=0)
        held = MovingDigitsSource(held_split.images, held_split.labels, f.frames, seed=1)
        n_held = min(int(f.heldout_images), len(held))
        return (
            len(train),
            lambda idx: moving_digits_rgb(train, idx, f.image_size),
            moving_digits_rgb(held, range(n_held), f.image_size),
        )
    from starflow_jax.data.video import VideoFolderSource

    src = VideoFolderSource(f.videos, f.frames, f.image_size, seed=0)
    held_idx, train_idx = heldout_split(len(src), f, "videos", "videos")

    def load(idx):
        return np.stack([src[int(i)]["video"] for i in idx])

    return len(train_idx), lambda idx: load(train_idx[idx]), load(held_idx)


def heldout_split(n: int, f, key: str, noun: str):
    """``(held-out indices, training indices)`` of ``n`` records: the first ``f.heldout_images``
    of a fixed permutation held out; a source of no more than that many is refused."""
    if n <= f.heldout_images:
        raise ValueError(
            f"finetune.{key} {f[key]} holds {n} {noun}: not more than finetune.heldout_images={f.heldout_images}"
        )
    perm = np.random.default_rng(0).permutation(n)
    return perm[: f.heldout_images], perm[f.heldout_images :]


def shard_data(f, video: bool = False):
    """``training_data`` from ``f.shards``, ``precompute --keep-pixels`` shards: their
    ``pixels`` (images ``(c, h, w)`` or clips ``(t, c, h, w)``, uint8) in [-1, 1]; held out:
    the first ``heldout_images`` records of a fixed permutation. A Wan VAE gets clips (image
    records as one-frame clips), the SD-VAE images."""
    from starflow_jax.data.array_record import ArrayRecordSource
    from starflow_jax.data.precompute import PIXELS, pixels_from_uint8

    first = ArrayRecordSource(f.shards)[0]
    if PIXELS not in first:
        raise ValueError(
            f"finetune.shards {f.shards}: its records hold no pixels (fields {sorted(first)}); precompute "
            "them again with `starflow-jax precompute ... --keep-pixels`"
        )
    src = ArrayRecordSource(f.shards, fields=[PIXELS])
    shape = tuple(first[PIXELS].shape)
    clips = len(shape) == 4
    if shape[-2:] != (f.image_size, f.image_size):
        raise ValueError(
            f"finetune.shards {f.shards} holds {shape[-2]}x{shape[-1]} pixels; finetune.image_size="
            f"{f.image_size}: set it to the shards' size (square pictures only)"
        )
    if clips and not video:
        raise ValueError(f"finetune.shards {f.shards} holds clips {shape}: fine-tune a Wan video VAE on them")
    frames = shape[0] if clips else 1
    if video and frames != f.frames:
        raise ValueError(f"finetune.shards {f.shards} holds clips of {frames} frames: set finetune.frames={frames}")
    held_idx, train_idx = heldout_split(len(src), f, "shards", "records")

    def load(idx):
        x = pixels_from_uint8(np.stack([src[int(i)][PIXELS] for i in idx]))
        return x[:, None] if video and not clips else x

    return len(train_idx), lambda idx: load(train_idx[idx]), load(held_idx)


def training_data(f, video: bool = False):
    """``(n_train, batch of indices -> images, held-out images)``, images ``(b, 3, s, s)`` in
    [-1, 1]: the embedded digits (upscaled) or ``f.images``, an image folder (held out: the
    first ``heldout_images`` of a fixed permutation; decoded per batch). ``video`` (a Wan
    VAE): clips ``(b, frames, 3, s, s)`` instead, ``training_clips``'s when ``f.frames > 1``
    or ``f.videos`` is set, else these images as one-frame clips. ``f.shards``: ``shard_data``'s."""
    if f.shards:
        return shard_data(f, video)
    if video and (f.frames > 1 or f.videos):
        return training_clips(f)
    if video:
        n, get, held = training_data(f)
        return n, lambda idx: get(idx)[:, None], held[:, None]
    if not f.images:
        from starflow_jax.data.digits import load_digits_splits

        train_split, held_split = load_digits_splits(f.num_train, seed=0)
        train = digits_rgb(train_split.images, f.image_size)
        return len(train), lambda idx: train[idx], digits_rgb(held_split.images[: f.heldout_images], f.image_size)
    from starflow_jax.data.image_folder import ImageFolderSource

    src = ImageFolderSource(f.images, f.image_size, 3)
    held_idx, train_idx = heldout_split(len(src), f, "images", "images")

    def load(idx):
        return np.stack([src[int(i)]["image"] for i in idx])

    return len(train_idx), lambda idx: load(train_idx[idx]), load(held_idx)


def _perceptual(args, need: bool):
    if not need:
        return None, None
    missing = [f"--{k}" for k in ("lpips-vgg", "lpips-heads", "convnext") if not getattr(args, k.replace("-", "_"))]
    if missing:
        raise ValueError(
            f"the perceptual term needs {', '.join(missing)} (weight files); pass them, or --no-perceptual "
            "(or --set decoder_loss.perceptual_weight=0) to train without it"
        )
    for k in ("lpips_vgg", "lpips_heads", "convnext"):
        if not os.path.isfile(getattr(args, k)):
            raise FileNotFoundError(f"--{k.replace('_', '-')} {getattr(args, k)} does not exist")
    from starflow_jax.autoencoders.finetune.convnext import load_convnext
    from starflow_jax.autoencoders.finetune.lpips import load_lpips

    return load_lpips(args.lpips_vgg, args.lpips_heads), load_convnext(args.convnext)


CONFIG_FILE = "finetune_config.json"


def _prepare_workdir(workdir: pathlib.Path, config_json: str) -> bool:
    """True when ``workdir`` holds a run of this config to resume; False for a new or empty
    one; an error for anything else (never overwriting a user's files)."""
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir} exists and is not a directory")
    if not workdir.exists() or not any(workdir.iterdir()):
        return False
    saved = workdir / CONFIG_FILE
    if not (saved.is_file() and (workdir / "checkpoints").is_dir()):
        raise FileExistsError(
            f"--workdir {workdir} is not empty and holds no finetune-decoder run to resume; not overwriting it"
        )
    if (workdir / "vae").exists():
        raise FileExistsError(f"--workdir {workdir} holds a finished run ({workdir / 'vae'}); choose a new workdir")
    old, new = json.loads(saved.read_text()), json.loads(config_json)
    old.pop("mesh", None), new.pop("mesh", None)  # a run may resume on another mesh (orbax reshards)
    from starflow_jax.config.decoder_loss import DECODER_LOSS_DEFAULTS
    from starflow_jax.config.finetune import FINETUNE_DEFAULTS

    # a key the saved config lacks (added to the settings since) counts at its default
    defaults = {"finetune": FINETUNE_DEFAULTS, "decoder_loss": DECODER_LOSS_DEFAULTS}
    differ = sorted(
        f"{sec}.{k}"
        for sec in set(old) | set(new)
        for k in set(old.get(sec, {})) | set(new.get(sec, {}))
        if old.get(sec, {}).get(k, defaults.get(sec, {}).get(k)) != new.get(sec, {}).get(k)
    )
    if differ:
        raise ValueError(
            f"--workdir {workdir} was started with another config (differing: {differ}); resume it with "
            f"the same settings (its {CONFIG_FILE}) or choose a new workdir"
        )
    return True


def check_data_settings(f, ae, vae_arg: str, loss=None) -> None:
    """The data settings ``f`` (and ``loss``) fit the autoencoder ``ae`` (``loading.Autoencoder``),
    or a clear error."""
    if loss is not None and loss.discriminator_3d and (ae.kind != "video" or f.frames < 2):
        raise ValueError(
            "decoder_loss.discriminator_3d scores whole clips: it needs a Wan video VAE and finetune.frames > 1 "
            f"(--vae {vae_arg} is {'a video' if ae.kind == 'video' else 'an image'} VAE, frames={f.frames})"
        )
    if f.image_size % ae.spatial:
        raise ValueError(f"finetune.image_size={f.image_size} is not a multiple of the VAE's factor {ae.spatial}")
    if sum(bool(x) for x in (f.images, f.videos, f.shards)) > 1:
        raise ValueError("finetune.images, finetune.videos and finetune.shards: set at most one (one data source)")
    if ae.kind != "video":
        if f.frames != 1 or f.videos:
            raise ValueError(
                f"finetune.frames={f.frames} / finetune.videos={f.videos!r} apply to a Wan video VAE; --vae "
                f"{vae_arg} holds an AutoencoderKL (images): leave frames at 1 and videos empty"
            )
        return
    from starflow_jax.autoencoders.wan_config import ENCODE_CHUNK

    if f.frames < 1 or (f.frames - 1) % ENCODE_CHUNK:
        raise ValueError(
            f"finetune.frames={f.frames}: the Wan VAE encodes 1 + {ENCODE_CHUNK}k frames (1, 5, 9, 13, ...)"
        )
    if f.images and f.frames > 1:
        raise ValueError(
            "finetune.images (an image folder) gives one-frame clips: set finetune.frames=1, or use "
            "finetune.videos (a video folder) or moving digits (no images / videos) for longer clips"
        )


def local_rows(idx: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous share of a global batch's indices (as the flow's pipeline)."""
    n = len(idx) // process_count
    return idx[process_index * n : (process_index + 1) * n]


def run(args) -> int:
    processes.initialize(args, log=lambda m: print(m, flush=True))  # before anything touches the devices
    config = load_finetune_config(args.config, args.set)
    f, loss = config.finetune, config.decoder_loss
    workdir = pathlib.Path(args.workdir)
    if args.no_perceptual:
        with loss.unlocked():
            loss.perceptual_weight = 0.0
    resume = _prepare_workdir(workdir, config.to_json(sort_keys=True))
    lpips, convnext = _perceptual(args, loss.perceptual_weight > 0)

    import jax

    from starflow_jax.autoencoders.export_vae import export_vae_to_diffusers
    from starflow_jax.autoencoders.finetune.trainer import Finetuner, check_finetune_mesh
    from starflow_jax.autoencoders.loading import load_autoencoder
    from starflow_jax.parallel.mesh import make_mesh

    lead, pid, nproc = jax.process_index() == 0, jax.process_index(), jax.process_count()
    log = (lambda *a, **k: print(*a, **k)) if lead else (lambda *a, **k: None)
    mesh = make_mesh(dict(config.mesh))
    check_finetune_mesh(mesh, int(f.batch_size), nproc)

    ae = load_autoencoder(args.vae)  # a clear error for a directory of any other class
    video = ae.kind == "video"
    check_data_settings(f, ae, args.vae, loss)
    n_train, train_batch, held = training_data(f, video)
    if n_train < f.batch_size:
        raise ValueError(
            f"finetune.batch_size={f.batch_size} exceeds the {n_train} training {'clips' if video else 'images'}"
        )
    tuner = Finetuner(
        ae.model, f, loss, steps_per_epoch=n_train // f.batch_size, lpips=lpips, convnext=convnext, mesh=mesh
    )
    state = tuner.init()
    held_key = jax.random.key(int(f.seed) + 1)

    from starflow_jax.workdir import checkpoints as ckpt

    processes.barrier("finetune_workdir_checked")  # every process has read the workdir before it changes
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (workdir / CONFIG_FILE).write_text(config.to_json(sort_keys=True, indent=2) + "\n")
    processes.barrier("finetune_workdir_ready")
    mgr = ckpt.manager(workdir / "checkpoints", f.keep_checkpoints, f.checkpoint_every)
    start_step = 0
    if resume:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        found, restored, _ = ckpt.restore_newest_good(mgr, abstract, workdir, log, barrier=processes.barrier)
        if found is not None:
            from starflow_jax.workdir.run import truncate_metrics

            state, start_step = restored, int(found)
            dropped = truncate_metrics(workdir, start_step)  # rows a killed run logged after it: logged again
            log(
                f"resumed from step {start_step} of {workdir / 'checkpoints'}"
                + (f" (dropped {dropped} metrics rows logged after it)" if dropped else ""),
                flush=True,
            )
    from starflow_jax.train.metrics_writer import MetricsWriter

    writer = MetricsWriter(workdir, enabled=lead)  # metrics.jsonl and tensorboard/ (process 0)

    def held_out(step: int, state) -> dict:
        mse, p = tuner.heldout_error(state, held, held_key)
        return {"heldout_noisy_mse": float(mse), "heldout_noisy_psnr": float(p)}

    def emit(row: dict) -> None:
        writer.write(int(row["step"]), row)
        log("  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    first = held_out(start_step, state)
    if start_step == 0:
        emit({"step": 0, "frozen_decoder": True, **first})
    start = time.time()
    stop = int(f.steps) if args.stop_at is None else min(int(args.stop_at), int(f.steps))
    for step in range(start_step, stop):
        idx = local_rows(batch_indices(n_train, step, f.batch_size, f.seed), pid, nproc)
        state, metrics = tuner.step(state, train_batch(idx))  # this process's rows of the global batch
        done = step + 1
        if done % f.log_every == 0 or done == f.steps:
            row = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            row.update(held_out(done, state), seconds=round(time.time() - start, 2))
            emit(row)
        if done == stop or done % f.checkpoint_every == 0:  # (orbax alone would also save the first step)
            ckpt.save(mgr, done, state, {"step": done}, force=True)
    mgr.wait_until_finished()
    mgr.close()
    writer.close()
    if stop < int(f.steps):
        log(f"stopped after step {stop} of {f.steps}; rerun the same command to continue", flush=True)
        return 0
    last = held_out(int(f.steps), state)
    vae = tuner.vae(state)  # on the host, every process (fsdp-sharded weights gathered first)
    if not lead:
        return 0
    out = export_vae_to_diffusers(vae, workdir / "vae")
    print(
        f"held-out noisy-latent MSE: {'frozen decoder' if start_step == 0 else f'at step {start_step}'} "
        f"{first['heldout_noisy_mse']:.5g}, fine-tuned "
        f"{last['heldout_noisy_mse']:.5g} after {f.steps} steps ({time.time() - start:.1f} s this run); wrote {out}",
        flush=True,
    )
    scale = getattr(ae.model.cfg, "temporal_latent_scale", 1.0)
    if scale != 1.0:
        print(f"(the temporal latent scale {scale} is not recorded there: pass --vae {out}:{scale:g})", flush=True)
    return 0
