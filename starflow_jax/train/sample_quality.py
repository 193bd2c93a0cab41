"""Sample quality measured while training (``config.eval``): ``eval.num_samples`` samples of
the current parameters (the EMA when kept), scored as ``starflow-jax eval`` scores them:
digits FD and class accuracy (with the motion score for moving-digits clips) for models of
the embedded digits, FID and Inception Score with ``eval.inception_weights`` and
``eval.stats`` for other pixel models. Process 0 samples and scores; the scores go into the
logged row (``metrics.jsonl``, TensorBoard) and ``result.json``."""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax import storage
from starflow_jax.config import ConfigError, model_config
from starflow_jax.evaluate import quality
from starflow_jax.sampling import block_policies
from starflow_jax.sampling.pipeline import TrainingNoise
from starflow_jax.sampling.sampler import SamplingOptions

# the scores printed in the training log, in this order, with their short names
_SHOWN = (
    ("digits_fd", "digits FD"),
    ("accuracy", "acc"),
    ("motion_score", "motion"),
    ("fid", "FID"),
    ("inception_score", "IS"),
    ("clip_score", "CLIP"),
)


def preview_options(config, guidance: float) -> SamplingOptions:
    """The ``config.sample`` sampling settings (Jacobi or sequential) with ``guidance``."""
    s, cfg = config.sample, model_config(config)
    return SamplingOptions(
        guidance=float(guidance),
        jacobi=bool(s.jacobi),
        jacobi_block_size=int(s.jacobi_block_size) or cfg.seq_side**2,
        jacobi_th=float(s.jacobi_th),
        jacobi_max_iter=int(s.jacobi_max_iter),
        jacobi_policy=str(s.jacobi_policy),
        jacobi_init=str(s.jacobi_init),
        jacobi_blocks=block_policies.parse(str(s.jacobi_blocks)),
    )


class SampleQuality:
    """Scores samples of a training run's parameters; built once per run (the settings
    checked and the networks read before the first step).

    Conditioning: labels spread over the classes, or, for text-conditioned models, the text
    embeddings of the held-out (else training) records in turn; latent models are decoded by
    ``eval.vae`` first; ``eval.clip`` adds the CLIP score of each sample against its
    record's caption (precomputed shards keep the captions)."""

    def __init__(self, config, workdir: pathlib.Path, log, data=None):
        self.config, self.log = config, log
        self.e = e = config.eval
        self.num = int(e.num_samples)
        self.every = int(e.every)
        self.inception = self.stats = self.vae = self.clip = None
        self.records = self.captions = None
        if not self.num:
            return
        cfg = model_config(config)
        self.digits = quality.is_digits(config, cfg)
        if self.digits:
            from starflow_jax.evaluate.digits_classifier import CACHE_NAME

            # a workdir on object storage: the classifier is cached on the local disk instead
            local = storage.is_local(workdir)
            cache = pathlib.Path(workdir) if local else pathlib.Path.home() / ".cache" / "starflow_jax"
            self.classifier = pathlib.Path(e.classifier) if e.classifier else cache / CACHE_NAME
            return
        if not (e.inception_weights or e.clip):
            raise ConfigError(
                "eval.num_samples on a model of other data than the embedded digits needs eval.inception_weights "
                "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth; for FID also eval.stats) or eval.clip"
            )
        if cfg.temporal_causal or int(config.data.get("num_frames", 0) or 0):
            raise ConfigError(
                "eval during training scores images; score a video model's samples with `starflow-jax eval`"
            )
        if cfg.in_channels not in (1, 3) and not e.vae:
            raise ConfigError(
                f"eval.num_samples: this model has {cfg.in_channels} (latent) channels: give eval.vae, the "
                "diffusers autoencoder that decodes its samples to pixels"
            )
        text = cfg.txt_dim > 0 and cfg.txt_size > 1
        if text:
            self.records = data.heldout if data is not None and data.heldout is not None else data.train
        else:
            quality.class_labels(cfg, self.num)  # labelled or unconditional
        if e.clip and not text:
            raise ConfigError("eval.clip scores samples against their captions: the model must be text-conditioned")
        if e.inception_weights:
            from starflow_jax.evaluate.frechet import load_statistics
            from starflow_jax.evaluate.inception import load_fid_inception

            self.stats = load_statistics(e.stats) if e.stats else None
            self.inception = load_fid_inception(e.inception_weights)
        if e.vae:
            from starflow_jax.autoencoders.loading import load_autoencoder

            self.vae = load_autoencoder(e.vae)
            if self.vae.latent_channels != cfg.in_channels:
                raise ConfigError(
                    f"eval.vae {e.vae} has {self.vae.latent_channels} latent channels, the model {cfg.in_channels}"
                )
        if e.clip:
            from starflow_jax.data.array_record import ArrayRecordSource
            from starflow_jax.evaluate import clip

            d = config.data
            path = d.heldout_path if data is not None and data.heldout is not None else d.path
            if str(d.name) != "array_record" or not path:
                raise ConfigError("eval.clip needs precomputed shards (data.name='array_record'), which keep captions")
            shards = ArrayRecordSource(path)
            if "caption" not in shards[0]:
                raise ConfigError(f"eval.clip: the records of {path} keep no caption")
            count = min(self.num, len(shards))
            self.captions = [str(shards[i]["caption"]) for i in range(count)]
            self.clip = clip.load_clip(e.clip)
            self.clip_ids = clip.tokenize(e.clip, self.captions)

    def due(self, step: int, total: int) -> bool:
        return bool(self.num) and (step == total or (self.every > 0 and step % self.every == 0))

    def _conditioning(self, cfg, labels):
        if self.records is None:
            return quality.label_conditioning(cfg, labels)
        return quality.record_conditioning(self.records)

    def __call__(self, graphdef, params) -> dict:
        """The scores of ``eval.num_samples`` samples of ``params`` (host arrays, every
        process's full copy): process 0 samples and scores, the others get ``{}``."""
        if jax.process_index() != 0:
            return {}
        e, config = self.e, self.config
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
        labels = None if self.records is not None else quality.class_labels(model.cfg, self.num)
        parts: dict[int, np.ndarray] = {}
        quality.sample_batches(
            model,
            config,
            range(math.ceil(self.num / int(e.batch_size))),
            num=self.num,
            batch_size=int(e.batch_size),
            seed=int(e.seed),
            opts=preview_options(config, float(e.cfg)),
            conditioning=self._conditioning(model.cfg, labels),
            temperature=float(e.temperature),
            noise=TrainingNoise.from_config(config),
            denoise=bool(config.sample.denoise),
            quantize=bool(config.sample.denoise),
            decode=None if self.vae is None else self.vae.decode,
            save=parts.__setitem__,
        )
        samples = np.concatenate([parts[i] for i in sorted(parts)])
        if self.digits:
            scores = quality.digits_quality(
                config, samples, labels, self.classifier, log=self.log, rounded=bool(config.sample.denoise)
            )
            return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}
        from starflow_jax.sampling.visualize import to_uint8

        pixels, scores = to_uint8(samples, pixel_space=True), {}
        if self.inception is not None:
            from starflow_jax.evaluate.scores import inception_features, inception_scores

            pool, logits = inception_features(self.inception, pixels)
            scores.update(inception_scores(pool, logits, self.stats, splits=int(e.is_splits)))
        if self.clip is not None:
            scores.update(quality.clip_quality(self.clip, pixels, self.clip_ids))
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}

    @staticmethod
    def describe(scores: dict) -> str:
        """``digits FD 3.05  acc 0.899`` (the scores a log line shows)."""
        return "  ".join(f"{name} {scores[k]:.3f}" for k, name in _SHOWN if k in scores)
