"""The training program, built from one config by ``train``, ``plan`` and ``bench train``
alike: the model's structure, the optimizer and its schedules, the step settings, the
train state's shardings over the mesh and the jitted step with explicit shardings. What
``plan`` compiles for a TPU slice is therefore what ``train`` runs there."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from starflow_jax.config import model_config
from starflow_jax.config.model_config import ModelConfig
from starflow_jax.data.digits import NUM_CLASSES
from starflow_jax.data.mixture import check_secondary_split
from starflow_jax.data.sources import latent_frames
from starflow_jax.layers.transformer import resolve_remat
from starflow_jax.model import StarFlow
from starflow_jax.parallel.mesh import check_batch_split, make_mesh
from starflow_jax.parallel.rules import batch_sharding, tree_shardings
from starflow_jax.train import optimizer
from starflow_jax.train import step as S


def step_settings(config, num_classes: int) -> S.StepConfig:
    """``config.train``'s settings of the step (noise, drops, clipping, remat, accumulation)."""
    t = config.train
    return S.StepConfig(
        noise_std=float(t.noise_std),
        noise_type=str(t.noise_type),
        levels=int(t.levels),
        num_classes=num_classes,
        drop_label=float(t.drop_label),
        latent_norm_regularization=float(t.latent_norm_regularization),
        grad_clip=float(t.grad_clip),
        grad_skip=bool(t.grad_skip),
        ema_decay=float(t.ema_decay),
        remat=resolve_remat(t.remat),
        grad_accum=int(t.grad_accum),
        cond_noise_level=bool(t.cond_noise_level),
        denoiser=bool(config.model.learnable_self_denoiser),
    )


def optimizer_for(config, cfg: ModelConfig):
    """``(schedule, tx)``: AdamW on the warmup + cosine schedule of ``config.train``; with a
    learnable denoiser, its parameters on their own schedule (``train.denoiser_lr``)."""
    t = config.train
    sched = optimizer.lr_schedule(float(t.lr), float(t.min_lr), int(t.warmup_steps), int(t.steps))
    tx = optimizer.adamw(
        sched, b1=float(t.b1), b2=float(t.b2), weight_decay=float(t.weight_decay), grad_clip=float(t.grad_clip)
    )
    if cfg.learnable_self_denoiser:
        den_sched = optimizer.lr_schedule(
            float(t.denoiser_lr), float(t.denoiser_min_lr), int(t.warmup_steps), int(t.steps), offset=1
        )
        tx = optimizer.flow_and_denoiser(
            tx,
            den_sched,
            weight_decay=float(t.weight_decay),
            grad_clip=float(t.grad_clip),
            accumulate_denoiser_grads=bool(t.denoiser_accumulate_grads),
        )
    return sched, tx


@dataclasses.dataclass(eq=False)
class Program:
    """One config's training program on one mesh. ``abstract_state``: the train state's
    shapes, dtypes and shardings (nothing allocated); ``step(state, batch)`` runs the jitted
    step (one compilation per batch layout: keys and ranks); ``lower(state, batch)``
    lowers it (arrays or ``jax.ShapeDtypeStruct``s)."""

    config: object
    cfg: ModelConfig
    mesh: object
    graphdef: object
    schedule: object
    tx: object
    hp: S.StepConfig
    state_shardings: object
    abstract_state: object

    def batch_shardings(self, batch: dict) -> dict:
        """The batch is split along its first axis over ``(data, fsdp)``, whatever its rank."""
        return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    @functools.cached_property
    def _jitted(self) -> dict:
        return {}

    def jitted_step(self, layout: tuple):
        """The jitted step for a batch layout ``((key, rank), ...)``."""
        if layout not in self._jitted:
            bshard = {k: batch_sharding(self.mesh, ndim) for k, ndim in layout}  # as batch_shardings gives
            self._jitted[layout] = jax.jit(
                functools.partial(S.train_step, graphdef=self.graphdef, tx=self.tx, hp=self.hp, schedule=self.schedule),
                in_shardings=(self.state_shardings, bshard),
                out_shardings=(self.state_shardings, None),
                donate_argnums=0,
            )
        return self._jitted[layout]

    @staticmethod
    def layout(batch: dict) -> tuple:
        return tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))

    def step(self, state, batch: dict):
        return self.jitted_step(self.layout(batch))(state, batch)

    def lower(self, state, batch: dict):
        return self.jitted_step(self.layout(batch)).lower(state, batch)

    def init_state(self, params=None):
        """A fresh train state made on the devices, already sharded (a model larger than one
        host's memory never exists whole anywhere): the config's seeded initialisation, or
        ``params`` (fine-tuning: a new optimizer state for them)."""
        t = self.config.train

        def make(params):
            model = StarFlow(self.cfg, rngs=nnx.Rngs(int(t.seed)))
            if params is not None:
                nnx.update(model, params)
            return S.init_state(model, self.tx, int(t.seed), self.hp.ema_decay > 0)

        return jax.jit(make, out_shardings=self.state_shardings)(params)


def training_mesh(config, devices=None):
    """The mesh of ``config.mesh`` over ``devices`` (default: all), after checking that every
    global batch the run feeds (``train.batch_size``, the secondary data's) splits over it
    into ``train.grad_accum`` micro-batches."""
    t = config.train
    mesh = make_mesh(dict(config.mesh), devices)
    check_batch_split(int(t.batch_size), int(t.grad_accum), mesh, "train.batch_size", "train.grad_accum")
    check_secondary_split(config, mesh)
    return mesh


def abstract_train_state(config, tx, hp: S.StepConfig):
    """``(graphdef, state)``: the model's structure and the train state's shapes and dtypes
    for ``config`` (nothing allocated; its parameters carry their declared logical axes)."""
    cfg = model_config(config)
    seed = int(config.train.seed)
    model = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(seed)))
    graphdef = nnx.graphdef(model)
    abstract = jax.eval_shape(
        lambda st: S.init_state(nnx.merge(graphdef, st), tx, seed, hp.ema_decay > 0), nnx.state(model)
    )
    return graphdef, abstract


def build_program(config, mesh, num_classes: int) -> Program:
    """The training program of ``config`` (a training config: model, train sections) on
    ``mesh``; ``num_classes`` > 0 for class-labelled data."""
    cfg = model_config(config)
    sched, tx = optimizer_for(config, cfg)
    hp = step_settings(config, num_classes)
    graphdef, abstract = abstract_train_state(config, tx, hp)
    shard = tree_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    return Program(
        config=config,
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        schedule=sched,
        tx=tx,
        hp=hp,
        state_shardings=shard,
        abstract_state=abstract,
    )


def batch_layout(config) -> tuple[int, dict]:
    """``(num_classes, {key: (shape of one example, dtype)})`` of the batches ``train`` feeds
    the step for ``config``, from the config alone (no data read: what ``plan`` compiles).
    Class-labelled data (digits, image folders) gives ``label``, text data ``cond``;
    video models get clips of the config's frames (``data.num_frames`` or ``data.vid_size``)."""
    m, d = config.model, config.data
    name = str(d.name)
    if name in ("digits", "moving_digits"):
        num_classes = NUM_CLASSES
    elif name == "image_folder":
        num_classes = int(m.txt_dim) - 1  # one-hot labels plus the null class
    else:
        num_classes = 0
    image = (int(m.in_channels), int(m.img_size), int(m.img_size))
    if int(m.get("temporal_causal", 0) or 0):
        frames = latent_frames(config)
        if not frames:
            raise ValueError(
                "a video model's batches are clips: set data.num_frames (latent frames per clip) or data.vid_size"
            )
        image = (frames,) + image
    layout = dict(image=(image, np.float32))
    if num_classes:
        layout["label"] = ((), np.int32)
    elif int(m.txt_dim) > 0:
        layout["cond"] = ((int(m.txt_size), int(m.txt_dim)), np.float32)
    return num_classes, layout
