"""The training loop: data, model, optimizer, jitted step, logging, held-out bits per
dimension, checkpoints (resume picks up the latest), sample grids."""
from __future__ import annotations

import functools
import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from starflow_jax.config import model_config
from starflow_jax.data.pipeline import drop_first_frame, drop_image_decision, eval_batches, train_dataset
from starflow_jax.data.sources import DataSpec, make_data
from starflow_jax.flow.loss import bits_per_dim
from starflow_jax.layers.transformer import resolve_remat
from starflow_jax.model import StarFlow
from starflow_jax.parallel.mesh import check_batch_split, make_mesh
from starflow_jax.parallel.rules import batch_sharding, tree_shardings
from starflow_jax.train import checkpoint, optimizer
from starflow_jax.train.metrics_writer import MetricsWriter
from starflow_jax.train import step as S


class WorkdirError(ValueError):
    pass


def _hp(config, num_classes: int) -> S.StepConfig:
    t = config.train
    return S.StepConfig(noise_std=float(t.noise_std), noise_type=str(t.noise_type), levels=int(t.levels),
                        num_classes=num_classes,
                        drop_label=float(t.drop_label), latent_norm_regularization=float(t.latent_norm_regularization),
                        grad_clip=float(t.grad_clip), grad_skip=bool(t.grad_skip), ema_decay=float(t.ema_decay),
                        remat=resolve_remat(t.remat), grad_accum=int(t.get("grad_accum", 1)),
                        cond_noise_level=bool(t.get("cond_noise_level", False)),
                        denoiser=bool(config.model.get("learnable_self_denoiser", False)))


def data_scale(config) -> float:
    """The bin width's inverse in model space, for bits per dimension of discrete data."""
    t = config.train
    return t.levels / 2.0 if t.noise_type == "uniform" else 1.0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def prepare_workdir(workdir: pathlib.Path, config, overwrite: bool) -> bool:
    """Create the workdir (process 0; the others wait for it); returns True when a run
    there should be resumed. A workdir holding another config's run is refused unless
    ``overwrite``, which discards that run's checkpoints, metrics and pictures."""
    cfg_file = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    ckpt = workdir / "checkpoints"
    if not overwrite and cfg_file.exists() and cfg_file.read_text() != text:
        raise WorkdirError(f"{workdir} holds a run with a different config ({cfg_file}); resume it with the same "
                           "config, choose another --workdir, or pass --overwrite to discard it")
    _barrier("starflow_workdir_checked")
    if jax.process_index() == 0:
        if overwrite and workdir.exists():
            for p in (ckpt, cfg_file, workdir / "samples.png", workdir / "metrics.jsonl", workdir / "tensorboard",
                      workdir / "result.json", *workdir.glob("samples_*.png")):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        workdir.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(text)
    _barrier("starflow_workdir_ready")
    return ckpt.exists() and any(ckpt.iterdir())


def build(config):
    cfg = model_config(config)
    t = config.train
    model = StarFlow(cfg, rngs=nnx.Rngs(int(t.seed)))
    sched = optimizer.lr_schedule(float(t.lr), float(t.min_lr), int(t.warmup_steps), int(t.steps))
    tx = optimizer.adamw(sched, b1=float(t.b1), b2=float(t.b2), weight_decay=float(t.weight_decay),
                         grad_clip=float(t.grad_clip))
    if cfg.learnable_self_denoiser:
        den_sched = optimizer.lr_schedule(float(t.get("denoiser_lr", 1e-4)), float(t.get("denoiser_min_lr", 1e-6)),
                                          int(t.warmup_steps), int(t.steps))
        tx = optimizer.flow_and_denoiser(tx, den_sched, weight_decay=float(t.weight_decay),
                                         grad_clip=float(t.grad_clip))
    return cfg, model, sched, tx


@functools.lru_cache(maxsize=8)
def _eval_fn(graphdef, hp: S.StepConfig, out_sharding=None):
    """One compiled evaluation per (model, step config), reused by every periodic evaluation."""
    return jax.jit(functools.partial(S.eval_nll, graphdef=graphdef, hp=hp), out_shardings=out_sharding)


def evaluate(config, graphdef, params, source, hp, mesh=None, batch_size: int = 256) -> float:
    """Held-out bits per dimension over a source. Every process runs it (the parameters
    may be sharded over all of them) on the whole split; the result is replicated."""
    rep = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    ev = _eval_fn(graphdef, hp, rep)
    nll = []
    for i, batch in enumerate(eval_batches(source, batch_size)):
        batch = {k: np.asarray(v) for k, v in batch.items() if k in ("image", "label", "cond")}
        nll.append(np.asarray(ev(params, batch, jax.random.key(1234 + i * batch_size))))
    return float(bits_per_dim(float(np.mean(np.concatenate(nll))), data_scale(config)))


def host_params(params):
    """The parameters as host NumPy arrays on every process (gathered across processes
    when they are sharded over several), for work each process does on its own."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def sample_grid(config, graphdef, params, path: pathlib.Path, data: DataSpec, seed: int = 0) -> None:
    """A grid of samples: one column per class for labelled data (``sample.per_class``
    rows), else ``sample.num`` samples conditioned on the first held-out (or training)
    records' text embeddings (video latents: one row of frames per sample). Written by
    process 0."""
    from starflow_jax.sampling import SamplingOptions, sample
    from starflow_jax.sampling.visualize import grid, save_png, to_uint8
    from starflow_jax.train.objective import one_hot_labels

    cfg = model_config(config)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, host_params(params)))
    if data.num_classes > 0:
        labels = jnp.tile(jnp.arange(data.num_classes), int(config.sample.per_class))
        y = one_hot_labels(labels, data.num_classes)
        y_null = one_hot_labels(-jnp.ones_like(labels), data.num_classes)
        nrow = data.num_classes
    else:
        src = data.heldout if data.heldout is not None else data.train
        n = min(int(config.sample.get("num", 16)), len(src))
        y = jnp.stack([jnp.asarray(src[i]["cond"], jnp.float32) for i in range(n)])
        y_null, nrow = jnp.zeros_like(y), None
    g = float(config.sample.cfg)
    shape = (cfg.in_channels, cfg.img_size, cfg.img_size)
    frames = np.shape(data.train[0]["image"])[0] if np.ndim(data.train[0]["image"]) == 4 else 0
    if frames:  # video latents: one row of frames per sample
        shape, nrow = (frames,) + shape, frames
    noise = jax.random.normal(jax.random.key(seed), (y.shape[0],) + shape)
    noise = noise * float(config.sample.temperature)
    x = sample(model, noise, jnp.concatenate([y, y_null]) if g > 0 else y,
               SamplingOptions(guidance=g, jacobi=True, jacobi_block_size=cfg.seq_side ** 2, jacobi_th=1e-5,
                               jacobi_max_iter=64))
    x = np.asarray(x)
    if frames:
        x = x.reshape((-1,) + x.shape[2:])
    if jax.process_index() == 0:
        save_png(path, grid(to_uint8(x, pixel_space=data.num_classes > 0), nrow=nrow), scale=int(config.sample.scale))


class _Progress:
    """A one-line progress bar on stderr (process 0, interactive terminals only)."""

    def __init__(self, total: int, start: int):
        import sys

        self.total, self.start, self.t0 = total, start, time.time()
        self.on = jax.process_index() == 0 and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if not self.on:
            return
        import sys

        frac = done / max(self.total, 1)
        rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        print(f"\r[{bar}] {done}/{self.total} {rate:.1f} steps/s eta {eta:.0f}s", end="", file=sys.stderr,
              flush=True)

    def clear(self) -> None:
        if self.on:
            import sys

            print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)


def init_params_from(source: str | pathlib.Path, config, params, step: int | None = None, ema: bool = False):
    """Parameters of another workdir (a training run's checkpoint, or reference weights
    imported with ``starflow-jax import``) for fine-tuning: the architectures must agree."""
    from starflow_jax.interop.checkpoints import load_params

    _, src_cfg, src_params = load_params(source, step, ema)
    cfg = model_config(config)
    # how the model computes (dtypes, attention kernel) may change; its architecture may not
    # (equal architectures give equal parameter shapes: load_params restored them by src_cfg)
    compute_only = ("dtype", "param_dtype", "attention_impl", "attention_block")
    arch = [f"{f}: {getattr(src_cfg, f)!r} there, {getattr(cfg, f)!r} here" for f in cfg.__dataclass_fields__
            if f not in compute_only and getattr(src_cfg, f) != getattr(cfg, f)]
    if arch:
        raise WorkdirError(f"cannot initialise from {source}: its model differs: " + "; ".join(arch))
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), src_params, params)


def train(config, workdir: str, overwrite: bool = False, log=print, stop_after: int | None = None,
          init_from: str | None = None, init_step: int | None = None, init_ema: bool = False) -> dict:
    """Train ``config`` in ``workdir``; ``stop_after`` ends the run early after that step
    (with a checkpoint), as a preemption would. ``init_from``: a fresh run starts from that
    workdir's parameters (fine-tuning: a new optimizer state, step 0); ignored when the
    workdir already holds a run to resume. With several processes
    (``jax.distributed``) every process runs this with the same arguments; process 0
    logs and writes the metrics, pictures and result."""
    workdir = pathlib.Path(workdir)
    lead = jax.process_index() == 0
    if not lead:
        log = lambda *a, **k: None  # noqa: E731
    data = make_data(config)  # bad data settings fail before the workdir is touched
    resume = prepare_workdir(workdir, config, overwrite)
    t = config.train
    cfg, model, sched, tx = build(config)
    graphdef = nnx.graphdef(model)
    hp = _hp(config, data.num_classes)
    if init_from is not None and not resume:
        nnx.update(model, init_params_from(init_from, config, nnx.state(model, nnx.Param), init_step, init_ema))
        log(f"initialised the parameters from {init_from} (fresh optimizer)")
    state = S.init_state(model, tx, int(t.seed), hp.ema_decay > 0)
    ds = train_dataset(data.train, global_batch=int(t.batch_size), seed=int(t.seed))
    it = iter(ds.to_iter_dataset())
    mesh = make_mesh(dict(config.mesh) if "mesh" in config else {"data": -1})
    check_batch_split(int(t.batch_size), hp.grad_accum, mesh, "train.batch_size", "train.grad_accum")
    shard = tree_shardings(state, mesh)
    rec = data.train[0]
    bshard = {k: batch_sharding(mesh, np.ndim(rec[k]) + 1) for k in ("image", "label", "cond") if k in rec}
    state = jax.device_put(state, shard)
    mgr = checkpoint.manager(workdir / "checkpoints", int(t.keep_checkpoints), int(t.checkpoint_every))
    start = 0
    if resume and mgr.latest_step() is not None:
        start = int(mgr.latest_step())
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                jax.eval_shape(lambda: state), shard)
        state, data_state = checkpoint.restore(mgr, start, abstract)
        it.set_state(data_state)
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    step_fn = jax.jit(functools.partial(S.train_step, graphdef=graphdef, tx=tx, hp=hp, schedule=sched),
                      in_shardings=(shard, bshard), out_shardings=(shard, None), donate_argnums=0)
    with jax.set_mesh(mesh):  # activations keep their batch sharding (parallel.rules.constrain_batch)
        return _steps(config, workdir, hp, data, it, mesh, bshard, state, mgr, start, step_fn, graphdef, log,
                      stop_after)


def _steps(config, workdir, hp, data, it, mesh, bshard, state, mgr, start, step_fn, graphdef, log, stop_after):
    """The step loop, periodic evaluation, samples and checkpoints, then the final report."""
    t = config.train
    heldout = data.heldout
    lead = jax.process_index() == 0
    writer = MetricsWriter(workdir)
    total = int(t.steps)
    sample_every = int(config.sample.get("every", 0)) if "sample" in config else 0
    t0, last_t, last_step = time.time(), time.time(), start
    progress = _Progress(total, start)
    drop_image = float(t.get("drop_image", 0.0) or 0.0)
    for s in range(start, total):
        local = next(it)  # this process's rows of the global batch
        if drop_image > 0:  # the whole global batch, decided from (seed, step): resumes decide the same
            local = drop_first_frame(local, drop_image_decision(int(t.seed), s, drop_image))
        batch = {k: jax.make_array_from_process_local_data(bshard[k], np.asarray(v)) for k, v in local.items()
                 if k in bshard}
        state, m = step_fn(state, batch)
        done = s + 1
        progress.update(done)
        if done % int(t.log_every) == 0 or done == total:
            now = time.time()
            row = dict(step=done, loss=float(m["loss"]), bpd=float(bits_per_dim(m["loss"], data_scale(config))),
                       grad_norm=float(m["grad_norm"]), lr=float(m["lr"]), skipped=int(m["skipped"]),
                       steps_per_s=(done - last_step) / max(now - last_t, 1e-9))
            if hp.denoiser:
                row.update(denoiser_loss=float(m["denoiser_loss"]), denoiser_grad_norm=float(m["denoiser_grad_norm"]))
            last_t, last_step = now, done
            if heldout is not None and t.eval_every and (done % int(t.eval_every) == 0 or done == total):
                row["heldout_bpd"] = evaluate(config, graphdef, state.params, heldout, hp, mesh)
            writer.write(done, row)
            progress.clear()
            log(f"step {done}/{total}  loss {row['loss']:.4f}  bpd {row['bpd']:.3f}  grad {row['grad_norm']:.3f}  "
                f"lr {row['lr']:.2e}  skipped {row['skipped']}  {row['steps_per_s']:.1f} steps/s"
                + (f"  denoiser loss {row['denoiser_loss']:.4f}" if hp.denoiser else "")
                + (f"  held-out bpd {row['heldout_bpd']:.3f}" if "heldout_bpd" in row else ""))
        if sample_every and done % sample_every == 0 and done < total:
            sample_grid(config, graphdef, state.ema if state.ema is not None else state.params,
                        workdir / f"samples_{done:07d}.png", data)
        stopping = stop_after is not None and done >= stop_after
        checkpoint.save(mgr, done, state, it.get_state(), force=done == total or stopping)
        if stopping:
            break
    progress.clear()
    mgr.wait_until_finished()
    writer.close()
    if stop_after is not None and int(state.step) < total:
        return dict(steps=int(state.step), stopped=True)
    heldout_bpd = None if heldout is None else evaluate(config, graphdef, state.params, heldout, hp, mesh)
    sample_grid(config, graphdef, state.ema if state.ema is not None else state.params, workdir / "samples.png", data)
    result = dict(steps=total, heldout_bpd=heldout_bpd, seconds=time.time() - t0, skipped=int(state.skipped),
                  samples=str(workdir / "samples.png"), checkpoint=str(workdir / "checkpoints"))
    summary = "" if heldout_bpd is None else f"held-out bits/dim {heldout_bpd:.3f}"
    if data.train_images is not None:  # the digits: Gaussian baselines on the same split
        from starflow_jax.data.baselines import gaussian_bpd

        levels = int(t.levels)
        result["gaussian_full_cov_bpd"] = full = gaussian_bpd(data.train_images, data.heldout_images, levels,
                                                              full_covariance=True)
        result["gaussian_diag_bpd"] = diag = gaussian_bpd(data.train_images, data.heldout_images, levels,
                                                          full_covariance=False)
        summary += f" (Gaussians fitted to the training split: full covariance {full:.3f}, independent pixels {diag:.3f})"
    if lead:
        (workdir / "result.json").write_text(json.dumps(result, indent=2))
    log(f"{summary}; samples {workdir / 'samples.png'}; {result['seconds']:.0f}s".lstrip("; "))
    return result
