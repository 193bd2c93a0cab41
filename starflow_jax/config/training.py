"""The sections of a training config besides ``model`` (``data``, ``train``, ``sample``,
``mesh``): every key declared once, with its default, and the checks that run before a
run touches its workdir.

A config file builds each section with ``train_section(steps=..., lr=...)`` (and
``data_section``, ``sample_section``, ``mesh_section``), naming only what differs from
these defaults; an unknown key is an error, so every key here can be overridden with
``--set SECTION.KEY=VALUE``.
"""

from __future__ import annotations

import ml_collections

from starflow_jax.config.model_config import ConfigError

DATA_DEFAULTS = dict(
    name="digits",  # digits | moving_digits | image_folder | array_record
    num_train=1500,  # digits / moving_digits: images of the training split (the rest are held out)
    split_seed=0,  # the train / held-out split (and moving_digits' clips)
    num_frames=0,  # clips: frames per clip (latent frames for array_record); 0: images, or from vid_size
    clip_variants=1,  # moving_digits: training clips per image, each with its own velocity and offset
    velocities="",  # moving_digits: the clips' velocities "dy,dx;dy,dx" in pixels per frame ("": the 8 of {-1,0,1}^2)
    motion_labels=False,  # moving_digits: label = digit + 10 * velocity index (condition on the motion too)
    vid_size="",  # the reference's "frames:fps": latent frames through the autoencoder's temporal factor
    root="",  # image_folder: root/<class>/<image>
    heldout_root="",  # image_folder: a held-out folder of the same classes ("" : a random heldout_fraction)
    heldout_fraction=0.05,  # image_folder: held-out share of root's images when heldout_root is ""
    path="",  # array_record: the directory of training shards (`starflow-jax precompute`)
    heldout_path="",  # array_record: held-out shards ("" : no held-out evaluation)
    mix_aspect=False,  # array_record: path (and secondary_path) hold one shard folder per aspect-ratio bucket
    secondary_path="",  # array_record: image shards for joint image + video training ("" : none)
)

SAMPLE_DEFAULTS = dict(
    per_class=4,  # labelled data: rows of samples.png (one column per class)
    num=16,  # text-conditioned data: samples, conditioned on the first held-out (else training) captions
    cfg=1.0,  # guidance weight of the preview samples
    temperature=0.9,  # noise temperature of the preview samples
    scale=4,  # pixel upscaling of the PNG grid
    every=0,  # also write samples_<step>.png every N steps (0: only samples.png at the end)
    jacobi=True,  # Jacobi iteration (else sequential inversion) for the previews
    jacobi_block_size=0,  # tokens per Jacobi block (0: a whole frame)
    jacobi_th=1e-5,  # Jacobi convergence threshold
    jacobi_max_iter=64,  # Jacobi iterations per block at most
    jacobi_policy="blockwise",  # blockwise (the reference's chunks) or adaptive (sampling.invert.jacobi)
    jacobi_init="noise",  # the first iterate of unsampled tokens: noise, zeros or (adaptive, video) previous
    jacobi_blocks="",  # one policy per flow block, deep first (sampling.block_policies; `bench jacobi --propose`)
    denoise=True,  # remove the training noise from the previews (sampling.pipeline), as `sample` does
)

EVAL_DEFAULTS = dict(
    num_samples=0,  # samples whose quality is measured at the end of the run (and every `every` steps); 0: none
    every=0,  # steps between those measurements during the run (a multiple of train.log_every; 0: only at the end)
    batch_size=250,  # samples generated per batch
    seed=0,  # the samples' noise (the same samples at every measurement, for a fixed model)
    cfg=0.0,  # guidance weight (0: none); the other sampling settings are config.sample's (jacobi, denoise)
    temperature=1.0,  # prior noise scale
    classifier="",  # digits models: the digits classifier cache ("": WORKDIR/digits_classifier.npz, trained once)
    inception_weights="",  # other pixel models: the FID Inception-v3 weight file (pytorch-fid's .pth)
    stats="",  # with inception_weights: the reference statistics .npz (mu, sigma) for FID ("": IS only)
    is_splits=10,  # Inception Score splits
    vae="",  # latent models: the diffusers autoencoder directory that decodes the samples before scoring
    clip="",  # text models on precomputed shards: a transformers CLIP directory, CLIP score against the captions
)

MESH_DEFAULTS = dict(
    data=-1,  # data-parallel axis (-1: the devices the other axes leave)
    fsdp=1,  # parameters, gradients and optimizer state sharded (ZeRO-3 style); the batch too
    tensor=1,  # tensor-parallel axis (attention heads, MLP width)
)

TRAIN_DEFAULTS = dict(
    steps=1000,  # optimizer updates in the run (extend a finished run by raising it)
    batch_size=64,  # global batch, over all processes and devices
    lr=1e-3,  # peak learning rate (AdamW), reached after warmup_steps
    min_lr=1e-5,  # end of the cosine decay
    warmup_steps=100,  # linear warmup (from min(min_lr, 1e-6); the reference's schedule: train.optimizer)
    b1=0.9,  # Adam beta1
    b2=0.95,  # Adam beta2
    weight_decay=1e-4,  # decoupled weight decay, on every parameter (the reference's one parameter group)
    grad_clip=1.0,  # global gradient norm clip (0: none)
    grad_skip=False,  # the reference's skip rule: skip updates whose gradient norm exceeds grad_clip
    noise_type="gaussian",  # 'gaussian' (noise augmentation, latents) or 'uniform' (dequantisation, pixels)
    noise_std=0.3,  # standard deviation of the Gaussian noise augmentation
    levels=256,  # grey levels of discrete data (uniform dequantisation, bits per dimension)
    drop_label=0.1,  # probability of dropping the label / caption (classifier-free guidance)
    secondary_batch_size=0,  # global batch of the steps drawn from data.secondary_path (0: batch_size)
    secondary_ratio=0.0,  # probability that a step trains on a data.secondary_path batch
    drop_image=0.0,  # video: probability of dropping the first frame's conditioning (the reference's drop_image)
    latent_norm_regularization=0.0,  # weight of the latent-norm penalty
    ema_decay=0.0,  # EMA of the parameters (0: no EMA kept)
    remat="none",  # rematerialisation policy: none, full, dots, dots_all, proj, offload
    grad_accum=1,  # micro-batches per update
    cond_noise_level=False,  # weight the loss by noise_std / 0.3 (the reference's option)
    denoiser_lr=1e-4,  # learnable denoiser: its own peak learning rate
    denoiser_min_lr=1e-6,  # learnable denoiser: end of its cosine decay
    # learnable denoiser: never zero its gradients between updates (each update adds the new ones to
    # those of the last update, clipped), as the reference's train.py does (a bug there: it zeroes only
    # the flow's); false: fresh gradients every update
    denoiser_accumulate_grads=False,
    seed=0,  # parameters, data order, noise and label drops
    log_every=100,  # steps between console / metrics.jsonl rows
    eval_every=1000,  # steps between held-out evaluations (0: only at the end)
    checkpoint_every=1000,  # steps between checkpoints (one is always written at the end)
    keep_checkpoints=3,  # checkpoints kept (>= 1; older ones are deleted)
    max_consecutive_skips=50,  # stop the run after this many skipped updates in a row (NaN loss, divergence)
    profile=(0, 0),  # (first step, steps): a jax.profiler trace of those steps in WORKDIR/profile (0 steps: none)
)


SECTIONS = dict(
    data=DATA_DEFAULTS, train=TRAIN_DEFAULTS, sample=SAMPLE_DEFAULTS, mesh=MESH_DEFAULTS, eval=EVAL_DEFAULTS
)


def _section(name: str, values: dict) -> ml_collections.ConfigDict:
    defaults = SECTIONS[name]
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {name} config keys: {unknown} (the keys: {sorted(defaults)})")
    return ml_collections.ConfigDict({**defaults, **values})


def data_section(**values) -> ml_collections.ConfigDict:
    """A ``config.data`` section: DATA_DEFAULTS with ``values`` applied."""
    return _section("data", values)


def train_section(**values) -> ml_collections.ConfigDict:
    """A ``config.train`` section: TRAIN_DEFAULTS with ``values`` applied."""
    return _section("train", values)


def sample_section(**values) -> ml_collections.ConfigDict:
    """A ``config.sample`` section: SAMPLE_DEFAULTS with ``values`` applied."""
    return _section("sample", values)


def eval_section(**values) -> ml_collections.ConfigDict:
    """A ``config.eval`` section (sample quality measured during training): EVAL_DEFAULTS
    with ``values`` applied."""
    return _section("eval", values)


def mesh_section(**values) -> ml_collections.ConfigDict:
    """A ``config.mesh`` section: MESH_DEFAULTS with ``values`` applied."""
    return _section("mesh", values)


def with_defaults(config: dict) -> dict:
    """A config read back from a workdir's ``config.json`` with the keys it predates filled
    in from the defaults (an older run resumes, samples and exports as before)."""
    out = dict(config)
    for name, defaults in SECTIONS.items():
        if name in out and isinstance(out[name], dict):
            out[name] = {**defaults, **out[name]}
        elif name == "eval" and "train" in out:  # a run from before the eval section
            out[name] = dict(defaults)
    return out


def _int(t, key: str, low: int) -> int:
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"train.{key} must be an integer >= {low}, got {v!r}")
    return v


def _float(t, key: str, low: float, high: float | None = None) -> float:
    v = t[key]
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not low <= v <= (float("inf") if high is None else high)
    ):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"train.{key} must be a number {bounds}, got {v!r}")
    return float(v)


def check_training_config(config) -> None:
    """Refuse a training config whose ``train`` values cannot run (before any file is
    written): missing keys, non-positive counts, probabilities outside [0, 1]."""
    for section in ("data", "train", "sample", "mesh", "eval"):
        if section not in config:
            raise ConfigError(f"the config has no '{section}' section: it is not a training config")
        missing = sorted(set(SECTIONS[section]) - set(config[section].keys()))
        if missing:
            raise ConfigError(
                f"it is not a training config: its {section} section lacks {missing} (build the "
                f"section with starflow_jax.config.{section}_section(...))"
            )
    t = config.train
    for key in (
        "steps",
        "batch_size",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "grad_accum",
        "max_consecutive_skips",
        "levels",
    ):
        _int(t, key, 1)
    for key in ("warmup_steps", "eval_every", "seed", "secondary_batch_size"):
        _int(t, key, 0)
    for key in (
        "lr",
        "min_lr",
        "weight_decay",
        "grad_clip",
        "noise_std",
        "latent_norm_regularization",
        "denoiser_lr",
        "denoiser_min_lr",
    ):
        _float(t, key, 0.0)
    for key in ("drop_label", "drop_image", "ema_decay", "secondary_ratio"):
        _float(t, key, 0.0, 1.0)
    _float(t, "b1", 0.0, 1.0)
    _float(t, "b2", 0.0, 1.0)
    profile = tuple(t.profile)
    if len(profile) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in profile):
        raise ConfigError(f"train.profile must be (first step, number of steps), two integers >= 0, got {t.profile!r}")
    if t.noise_type not in ("gaussian", "uniform"):
        raise ConfigError(f"train.noise_type must be 'gaussian' or 'uniform', got {t.noise_type!r}")
    if t.secondary_batch_size % t.grad_accum:
        raise ConfigError(
            f"train.secondary_batch_size={t.secondary_batch_size} does not split into "
            f"train.grad_accum={t.grad_accum} micro-batches"
        )
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not split into train.grad_accum={t.grad_accum} micro-batches"
        )
    _check_eval(config.eval, t)
    s = config.sample
    if s.jacobi_policy not in ("blockwise", "adaptive"):
        raise ConfigError(f"sample.jacobi_policy must be 'blockwise' or 'adaptive', got {s.jacobi_policy!r}")
    from starflow_jax.sampling import block_policies  # noqa: PLC0415 (sampling imports the model, which imports config)
    from starflow_jax.sampling.invert import JACOBI_INITS  # noqa: PLC0415

    if s.jacobi_init not in JACOBI_INITS:
        raise ConfigError(f"sample.jacobi_init must be one of {', '.join(JACOBI_INITS)}, got {s.jacobi_init!r}")
    if s.jacobi_init == "previous" and s.jacobi_policy != "adaptive":
        raise ConfigError("sample.jacobi_init='previous' needs sample.jacobi_policy='adaptive'")
    try:
        policies = block_policies.parse(str(s.jacobi_blocks))
    except ValueError as e:
        raise ConfigError(f"sample.jacobi_blocks: {e}") from None
    num_blocks = int(config.model.num_blocks)
    if policies and len(policies) != num_blocks:
        raise ConfigError(
            f"sample.jacobi_blocks gives {len(policies)} policies for model.num_blocks={num_blocks} (deep block first)"
        )


def _check_eval(e, t) -> None:
    def count(key: str, low: int) -> int:
        v = e[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"eval.{key} must be an integer >= {low}, got {v!r}")
        return v

    num = count("num_samples", 0)
    if num == 1:
        raise ConfigError("eval.num_samples must be 0 (none) or >= 2 (a covariance), got 1")
    every = count("every", 0)
    count("batch_size", 1)
    count("seed", 0)
    count("is_splits", 1)
    for key in ("cfg", "temperature"):
        v = e[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"eval.{key} must be a number >= 0, got {v!r}")
    if every and every % int(t.log_every):
        raise ConfigError(
            f"eval.every={every} must be a multiple of train.log_every={t.log_every} (the scores go in the logged rows)"
        )
    if every and not num:
        raise ConfigError(f"eval.every={every} needs eval.num_samples > 0 (how many samples to score)")
    if e.stats and not e.inception_weights:
        raise ConfigError("eval.stats needs eval.inception_weights (the FID Inception-v3 weight file)")
