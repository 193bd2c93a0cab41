"""The training loop: data, the training program (train.program), logging, held-out bits per
dimension, checkpoints (resume picks up the latest), sample grids."""

from __future__ import annotations

import dataclasses
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

from starflow_jax import storage
from starflow_jax.config import check_training_config, model_config
from starflow_jax.data.mixture import train_batches
from starflow_jax.data.pipeline import drop_first_frame, drop_image_decision, eval_batches
from starflow_jax.data.sources import DataSpec, make_data
from starflow_jax.flow.labels import one_hot_labels
from starflow_jax.flow.loss import bits_per_dim
from starflow_jax.sampling.pipeline import Conditioning, TrainingNoise, generate
from starflow_jax.sampling.visualize import grid, save_png, to_uint8
from starflow_jax.train import step as S
from starflow_jax.train.metrics_writer import MetricsWriter
from starflow_jax.train.program import Program, build_program, training_mesh
from starflow_jax.train.sample_quality import SampleQuality, preview_options
from starflow_jax.train.termination import Termination, distributed_client
from starflow_jax.workdir import checkpoints, layout
from starflow_jax.workdir import run as wd
from starflow_jax.workdir.params import load_params
from starflow_jax.workdir.run import WorkdirError, WorkdirLock


def data_scale(config) -> float:
    """The bin width's inverse in model space, for bits per dimension of discrete data."""
    t = config.train
    return t.levels / 2.0 if t.noise_type == "uniform" else 1.0


@functools.lru_cache(maxsize=8)
def _eval_fn(graphdef, hp: S.StepConfig, out_sharding=None):
    """One compiled evaluation per (model, step config), reused by every periodic evaluation."""
    return jax.jit(functools.partial(S.eval_nll, graphdef=graphdef, hp=hp), out_shardings=out_sharding)


@dataclasses.dataclass(frozen=True)
class HeldOutBpd:
    """Held-out bits per dimension; for video models also per frame (``frames[k]``: frame
    ``k + 1``'s, given the frames before it for a time-causal model). ``bpd`` is the mean of
    ``frames`` (every frame has as many dimensions)."""

    bpd: float
    frames: tuple[float, ...] | None = None

    @property
    def first_frame(self) -> float | None:
        return None if self.frames is None else self.frames[0]

    @property
    def later_frames(self) -> float | None:
        """The mean over frames 2.. (``None`` for images and one-frame clips)."""
        return None if self.frames is None or len(self.frames) < 2 else float(np.mean(self.frames[1:]))

    def fields(self, prefix: str = "heldout_bpd") -> dict:
        """The metrics.jsonl / result.json fields: ``prefix``, and for video
        ``prefix_frame1``, ``prefix_later_frames``, ``prefix_per_frame``."""
        out = {prefix: self.bpd}
        if self.frames is not None:
            out[f"{prefix}_frame1"] = self.first_frame
            if self.later_frames is not None:
                out[f"{prefix}_later_frames"] = self.later_frames
            out[f"{prefix}_per_frame"] = list(self.frames)
        return out

    def describe(self) -> str:
        """``2.676`` or, for video, ``2.676 (frame 1 2.901, later frames 2.601)``."""
        text = f"{self.bpd:.3f}"
        if self.frames is not None and self.later_frames is not None:
            text += f" (frame 1 {self.first_frame:.3f}, later frames {self.later_frames:.3f})"
        return text


def heldout_bpd(config, graphdef, params, source, hp, mesh=None, batch_size: int = 256) -> HeldOutBpd:
    """Held-out bits per dimension over a source (per frame for clips). Every process runs
    it (the parameters may be sharded over all of them) on the whole split; the result is
    replicated."""
    rep = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    ev = _eval_fn(graphdef, hp, rep)
    nll = []
    video = False
    for i, batch in enumerate(eval_batches(source, batch_size)):
        batch = {k: np.asarray(v) for k, v in batch.items() if k in ("image", "label", "cond")}
        video = batch["image"].ndim == 5
        nll.append(np.asarray(ev(params, batch, jax.random.key(1234 + i * batch_size))))
    per_frame = np.mean(np.concatenate(nll), axis=0)  # (t,): every example has as many frames
    scale = data_scale(config)
    frames = tuple(float(bits_per_dim(float(v), scale)) for v in per_frame)
    return HeldOutBpd(float(bits_per_dim(float(np.mean(per_frame)), scale)), frames if video else None)


def evaluate(config, graphdef, params, source, hp, mesh=None, batch_size: int = 256) -> float:
    """Held-out bits per dimension over a source (``heldout_bpd(...).bpd``)."""
    return heldout_bpd(config, graphdef, params, source, hp, mesh, batch_size).bpd


def host_params(params):
    """The parameters as host NumPy arrays on every process (gathered across processes
    when they are sharded over several), for work each process does on its own."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def sample_grid(config, graphdef, params, path: pathlib.Path, data: DataSpec, seed: int = 0) -> np.ndarray:
    """A grid of preview samples through the sampling pipeline with the ``config.sample``
    settings (denoised as ``starflow-jax sample`` does): one column per class for labelled
    data (``sample.per_class`` rows), else ``sample.num`` samples conditioned on the first
    held-out (or training) records' text embeddings (video latents: one row of frames per
    sample). Written by process 0; returns the samples (video: ``(n, t, c, h, w)``)."""
    cfg, s = model_config(config), config.sample
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, host_params(params)))
    if data.num_classes > 0:
        classes = np.arange(data.num_classes)
        if config.data.get("motion_labels", False):  # moving digits: each digit once, moving its own way
            from starflow_jax.data.moving_digits import DIGIT_CLASSES, config_velocities, motion_label

            classes = np.array([motion_label(d, d % len(config_velocities(config))) for d in range(DIGIT_CLASSES)])
        labels = jnp.tile(jnp.asarray(classes), int(s.per_class))
        cond = Conditioning(
            one_hot_labels(labels, data.num_classes), one_hot_labels(-jnp.ones_like(labels), data.num_classes)
        )
        nrow = len(classes)
    else:
        src = data.heldout if data.heldout is not None else data.train
        n = min(int(s.num), len(src))
        y = jnp.stack([jnp.asarray(src[i]["cond"], jnp.float32) for i in range(n)])
        cond, nrow = Conditioning(y, jnp.zeros_like(y)), None
    shape = (cond.y.shape[0], cfg.in_channels, cfg.img_size, cfg.img_size)
    frames = np.shape(data.train[0]["image"])[0] if np.ndim(data.train[0]["image"]) == 4 else 0
    if frames:  # video latents: one row of frames per sample
        shape, nrow = shape[:1] + (frames,) + shape[1:], frames
    x = generate(
        model,
        shape,
        seed,
        cond,
        preview_options(config, float(s.cfg)),
        temperature=float(s.temperature),
        noise=TrainingNoise.from_config(config),
        denoise_samples=bool(s.denoise),
        quantize_samples=bool(s.denoise),
    ).x
    samples = np.asarray(x)
    if frames:
        x = x.reshape((-1,) + x.shape[2:])
    if jax.process_index() == 0:
        save_png(path, grid(to_uint8(x, pixel_space=data.num_classes > 0), nrow=nrow), scale=int(s.scale))
    return samples


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
        print(f"\r[{bar}] {done}/{self.total} {rate:.1f} steps/s eta {eta:.0f}s", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.on:
            import sys

            print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)


def init_params_from(source: str | pathlib.Path, config, params, step: int | None = None, ema: bool = False):
    """Parameters of another workdir (a training run's checkpoint, or reference weights
    imported with ``starflow-jax import``) for fine-tuning: the architectures must agree."""

    _, src_cfg, src_params = load_params(source, step, ema)
    cfg = model_config(config)
    # how the model computes (dtypes, attention kernel) may change, and the parameters are cast
    # to this run's param_dtype; its architecture may not (equal architectures give equal
    # parameter shapes: load_params restored them by src_cfg)
    arch = wd.model_differences(
        dataclasses.asdict(src_cfg), dataclasses.asdict(cfg), ignore=wd.COMPUTE_ONLY + ("param_dtype",), prefix=""
    )
    if arch:
        raise WorkdirError(f"cannot initialise from {source}: its model differs: " + "; ".join(arch))
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), src_params, params)


class TrainingStopped(RuntimeError):
    """The run cannot go on (diverged, non-finite state); the message names the last
    good checkpoint."""


def train(
    config,
    workdir: str,
    overwrite: bool = False,
    log=print,
    stop_after: int | None = None,
    init_from: str | None = None,
    init_step: int | None = None,
    init_ema: bool = False,
    step: int | None = None,
) -> dict:
    """Train ``config`` in ``workdir``, resuming its newest readable checkpoint (``step``:
    that checkpoint; newer ones are set aside). ``stop_after`` ends the run early after
    that step (with a checkpoint), as a preemption would; SIGTERM does the same at the
    next step. ``init_from``: a fresh run starts from that workdir's parameters
    (fine-tuning: a new optimizer state, step 0); a workdir made by ``starflow-jax
    import`` starts from its own imported parameters. With several processes
    (``jax.distributed``) every process runs this with the same arguments; process 0
    logs and writes the metrics, pictures and result.

    Everything that can be checked is checked before the workdir is touched: the train
    settings, the data, the mesh and batch split. ``workdir`` may be on object storage
    (``gs://bucket/run``: see ``starflow_jax.storage``; such a workdir is not locked)."""
    workdir = storage.as_path(workdir)
    if not jax.process_index() == 0:
        log = lambda *a, **k: None  # noqa: E731
    check_training_config(config)
    data = make_data(config)
    mesh = training_mesh(config)
    scorer = SampleQuality(config, workdir, log, data)  # its settings checked, its networks read, before the workdir
    lock = WorkdirLock(workdir)
    try:
        with Termination(client=distributed_client()) as term:
            return _train_locked(
                config,
                workdir,
                overwrite,
                log,
                stop_after,
                init_from,
                init_step,
                init_ema,
                step,
                data,
                mesh,
                term,
                scorer,
            )
    finally:
        lock.release()


def _train_locked(
    config, workdir, overwrite, log, stop_after, init_from, init_step, init_ema, step, data, mesh, term, scorer
) -> dict:
    wd.prepare(workdir, config, overwrite, log)
    resume = wd.has_checkpoints(workdir)
    if step is not None and not resume:
        raise WorkdirError(f"--step {step}: {workdir} holds no checkpoints to resume")
    t = config.train
    program = build_program(config, mesh, data.num_classes)
    graphdef, hp = program.graphdef, program.hp
    if not resume and init_from is None and (workdir / layout.IMPORTED_PARAMS).exists():
        init_from = workdir  # an imported workdir: its reference weights are where the run starts
    params = None
    if init_from is not None and not resume:
        params = init_params_from(init_from, config, program.abstract_state.params, init_step, init_ema)
        log(f"initialised the parameters from {init_from} (fresh optimizer)")
    it = train_batches(data, config)  # buckets / secondary data: batches of several shapes
    mgr = checkpoints.manager(workdir / layout.CHECKPOINTS, int(t.keep_checkpoints), int(t.checkpoint_every))
    start = 0
    if resume:
        found, restored, data_state = checkpoints.restore_newest_good(
            mgr, program.abstract_state, workdir, log, step, wd.barrier
        )
        if found is None:
            raise WorkdirError(
                f"no checkpoint in {workdir / layout.CHECKPOINTS} could be read (each was set aside to "
                f"{workdir / layout.SET_ASIDE}); pass --overwrite to start a new run there"
            )
        start, state = found, restored
        it.set_state(data_state)
        dropped = wd.truncate_metrics(workdir, start)
        log(
            f"resumed from {workdir / layout.CHECKPOINTS} at step {start}"
            + (f" (dropped {dropped} metrics rows logged after it)" if dropped else "")
        )
    else:
        state = program.init_state(params)
    step_fn = program.step  # one compilation per batch layout (image / video batches share the state)
    run = _Run(
        config=config,
        workdir=workdir,
        hp=hp,
        data=data,
        mesh=mesh,
        program=program,
        mgr=mgr,
        graphdef=graphdef,
        log=log,
        term=term,
        scorer=scorer,
    )
    with jax.set_mesh(mesh):  # activations keep their batch sharding (parallel.rules.constrain_batch)
        try:
            return _steps(run, it, state, start, step_fn, stop_after)
        except BaseException as e:
            # an error or Ctrl-C mid-run: finish the checkpoint being written (never leave
            # it half-saved), then report which step a rerun resumes from
            mgr.wait_until_finished()
            if isinstance(e, KeyboardInterrupt):
                log(f"interrupted; the newest checkpoint is step {mgr.latest_step()} in {workdir / layout.CHECKPOINTS}")
            raise
        finally:
            mgr.close()


@dataclasses.dataclass
class _Run:
    """What the step loop needs besides the state and the step function."""

    config: object
    workdir: pathlib.Path
    hp: S.StepConfig
    data: DataSpec
    mesh: object
    program: Program  # its batch_shardings place each process's rows of the global batch
    mgr: object
    graphdef: object
    log: object
    term: Termination
    scorer: SampleQuality  # config.eval: sample quality in the logged rows


class _SkipWatch:
    """Counts skipped updates in a row from the step metrics, one step late (the previous
    step's count is read once the next step is queued, so the devices never wait)."""

    def __init__(self, limit: int, skipped: int):
        self.limit, self.last, self.run, self.pending = limit, skipped, 0, None

    def push(self, done: int, skipped) -> int | None:
        """Record step ``done``'s running skip count; returns the step at which the limit
        was reached, if it was."""
        prev, self.pending = self.pending, (done, skipped)
        return None if prev is None else self._check(*prev)

    def flush(self) -> int | None:
        prev, self.pending = self.pending, None
        return None if prev is None else self._check(*prev)

    def _check(self, done: int, skipped) -> int | None:
        total = int(skipped)
        self.run = self.run + 1 if total > self.last else 0
        self.last = total
        return done if self.run >= self.limit else None


def _stop_message(run: _Run, why: str, before: int | None = None) -> str:
    """``why``, and the newest checkpoint (written before step ``before``) to go back to."""
    steps = [s for s in run.mgr.all_steps() if before is None or s < before]
    where = (
        f"the last good checkpoint is step {max(steps)} in {run.workdir / layout.CHECKPOINTS}"
        if steps
        else "no checkpoint was written before it"
    )
    return (
        f"{why}; {where}. Lower train.lr, check the data, or raise train.max_consecutive_skips, then resume "
        "with --step N (or run the same command to resume the newest checkpoint)"
    )


class _Trace:
    """A ``jax.profiler`` trace of steps ``first .. first + steps - 1`` (TensorBoard's
    profile plugin / xprof read ``directory``); every process traces its own host. A
    ``directory`` on object storage: traced to a local directory, uploaded when it ends."""

    def __init__(self, directory: pathlib.Path, first: int, steps: int, log):
        self.directory, self.first, self.last, self.log, self.on = directory, first, first + steps - 1, log, False
        self.local = None

    def before(self, step: int) -> None:
        if step == self.first and self.last >= self.first:
            remote = not storage.is_local(self.directory)
            self.local = storage.local_staging_dir("starflow-profile-") if remote else self.directory
            jax.profiler.start_trace(str(self.local))
            self.on = True

    def after(self, step: int, state) -> None:
        if self.on and step >= self.last:
            jax.block_until_ready(state)
            self.close()
            self.log(
                f"profile of steps {self.first}-{self.last}: {self.directory} (tensorboard --logdir {self.directory})"
            )

    def close(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = False
            if self.local != self.directory:
                storage.upload_tree(self.local, self.directory)
                shutil.rmtree(self.local, ignore_errors=True)


def _preview_params(state):
    """The parameters samples are drawn from: the EMA when the run keeps one."""
    return state.ema if state.ema is not None else state.params


def _steps(run: _Run, it, state, start: int, step_fn, stop_after: int | None) -> dict:
    """The step loop, periodic evaluation, samples and checkpoints, then the final report."""
    config, workdir, hp, data, log = run.config, run.workdir, run.hp, run.data, run.log
    t = config.train
    heldout = data.heldout
    lead = jax.process_index() == 0
    writer = MetricsWriter(workdir)
    total = int(t.steps)
    sample_every = int(config.sample.every)
    t0, last_t, last_step = time.time(), time.time(), start
    progress = _Progress(total, start)
    drop_image = float(t.drop_image)
    skips = _SkipWatch(int(t.max_consecutive_skips), int(state.skipped))
    stopped = None
    last_scores: dict = {}
    trace = _Trace(workdir / "profile", *tuple(t.profile), log)
    run.term.begin(start)
    try:
        for s in range(start, total):
            trace.before(s + 1)
            local = next(it)  # this process's rows of the global batch
            if drop_image > 0:  # the whole global batch, decided from (seed, step): resumes decide the same
                video = np.ndim(local["image"]) == 5  # image batches (secondary data) keep all of theirs
                local = drop_first_frame(local, video and drop_image_decision(int(t.seed), s, drop_image))
            local = {k: np.asarray(v) for k, v in local.items() if k in ("image", "label", "cond")}
            batch = {
                k: jax.make_array_from_process_local_data(sh, local[k])
                for k, sh in run.program.batch_shardings(local).items()
            }
            state, m = step_fn(state, batch)
            done = s + 1
            trace.after(done, state)
            # reads the previous step's count: no process's host runs more than a step ahead of the
            # slowest device, which the SIGTERM agreement (termination.MARGIN) relies on
            bad = skips.push(done, m["skipped"])
            if bad is None and done == total:
                bad = skips.flush()
            if bad is not None:
                first = bad - skips.run + 1
                raise TrainingStopped(
                    _stop_message(
                        run,
                        f"stopped at step {bad}: the {skips.run} updates since step "
                        f"{first} were all skipped (non-finite loss, gradients or "
                        "parameters)",
                        before=first,
                    )
                )
            progress.update(done)
            if done % int(t.log_every) == 0 or done == total:
                now = time.time()
                row = dict(
                    step=done,
                    loss=float(m["loss"]),
                    bpd=float(bits_per_dim(m["loss"], data_scale(config))),
                    grad_norm=float(m["grad_norm"]),
                    lr=float(m["lr"]),
                    skipped=int(m["skipped"]),
                    steps_per_s=(done - last_step) / max(now - last_t, 1e-9),
                )
                if hp.denoiser:
                    row.update(
                        denoiser_loss=float(m["denoiser_loss"]), denoiser_grad_norm=float(m["denoiser_grad_norm"])
                    )
                last_t, last_step = now, done
                held = None
                if heldout is not None and t.eval_every and (done % int(t.eval_every) == 0 or done == total):
                    held = heldout_bpd(config, run.graphdef, state.params, heldout, hp, run.mesh)
                    row.update(held.fields())
                scores = None
                if run.scorer.due(done, total):
                    scores = run.scorer(run.graphdef, host_params(_preview_params(state)))
                    row.update(scores)
                    last_scores = scores
                writer.write(done, row)
                progress.clear()
                log(
                    f"step {done}/{total}  loss {row['loss']:.4f}  bpd {row['bpd']:.3f}  grad {row['grad_norm']:.3f}  "
                    f"lr {row['lr']:.2e}  skipped {row['skipped']}  {row['steps_per_s']:.1f} steps/s"
                    + (f"  denoiser loss {row['denoiser_loss']:.4f}" if hp.denoiser else "")
                    + (f"  held-out bpd {held.describe()}" if held is not None else "")
                    + (f"  {SampleQuality.describe(scores)}" if scores else "")
                )
            if sample_every and done % sample_every == 0 and done < total:
                sample_grid(config, run.graphdef, _preview_params(state), workdir / layout.periodic_samples(done), data)
            # asked to stop (SIGTERM, any process): every process stops after the agreed step, with a
            # checkpoint; agreed at the last step, the run simply ends as usual
            agreed = run.term.stop_step(done)
            if stop_after is not None and done >= stop_after:
                stopped = "stop_after"
            elif agreed == done and done < total:
                stopped = "SIGTERM"
            t_save = time.time()
            try:
                saved = checkpoints.save(run.mgr, done, state, it.get_state(), force=done == total or bool(stopped))
            except checkpoints.NonFiniteState as e:
                raise TrainingStopped(_stop_message(run, str(e))) from None
            if saved:
                blocked = time.time() - t_save
                writer.write_event(done, "checkpoint_block_s", blocked)
                log(f"checkpoint step {done}: the step loop waited {blocked:.2f} s (written asynchronously)")
            if stopped:
                break
    finally:
        trace.close()
        progress.clear()
        writer.close()
    run.mgr.wait_until_finished()
    if stopped is not None and int(state.step) < total:
        if stopped == "SIGTERM":
            log(
                f"stopped by SIGTERM after step {int(state.step)}; the newest checkpoint is step "
                f"{run.mgr.latest_step()}: run the same command to resume"
            )
        return dict(steps=int(state.step), stopped=True, reason=stopped)
    held = None if heldout is None else heldout_bpd(config, run.graphdef, state.params, heldout, hp, run.mesh)
    samples = sample_grid(config, run.graphdef, _preview_params(state), workdir / layout.FINAL_SAMPLES, data)
    result = dict(
        steps=total,
        **(held.fields() if held is not None else dict(heldout_bpd=None)),
        seconds=time.time() - t0,
        skipped=int(state.skipped),
        **last_scores,
        samples=str(workdir / layout.FINAL_SAMPLES),
        checkpoint=str(workdir / layout.CHECKPOINTS),
    )
    summary = "" if held is None else f"held-out bits/dim {held.describe()}"
    if data.train_images is not None:  # the digits: Gaussian baselines on the same split
        from starflow_jax.data.baselines import gaussian_bpd

        levels = int(t.levels)
        result["gaussian_full_cov_bpd"] = full = gaussian_bpd(
            data.train_images, data.heldout_images, levels, full_covariance=True
        )
        result["gaussian_diag_bpd"] = diag = gaussian_bpd(
            data.train_images, data.heldout_images, levels, full_covariance=False
        )
        summary += (
            f" (Gaussians fitted to the training split: full covariance {full:.3f}, independent pixels {diag:.3f})"
        )
    if last_scores:
        summary += f"; {config.eval.num_samples} samples: {SampleQuality.describe(last_scores)}"
    if config.data.name == "moving_digits" and samples.ndim == 5 and samples.shape[1] > 1:
        # how much the preview clips move like the data: 0 for a digit rolled by one velocity
        from starflow_jax.data import moving_digits as md

        real = heldout if heldout is not None else data.train
        clips = np.stack([real[i]["image"] for i in range(len(real))])
        # previews are rounded to the levels when denoised (sample.denoise): their floor is 0
        motion = md.config_motion_report(config, samples, clips, rounded=bool(config.sample.denoise))
        result.update(motion)
        summary += f"; {md.describe_motion(motion)}"
    if lead:
        (workdir / layout.RESULT).write_text(json.dumps(result, indent=2))
    log(f"{summary}; samples {workdir / 'samples.png'}; {result['seconds']:.0f}s".lstrip("; "))
    return result
