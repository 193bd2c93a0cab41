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

from starflow_jax.config import ConfigError, model_config
from starflow_jax.evaluate import quality
from starflow_jax.sampling.pipeline import TrainingNoise
from starflow_jax.sampling.sampler import SamplingOptions

# the scores printed in the training log, in this order, with their short names
_SHOWN = (
    ("digits_fd", "digits FD"),
    ("accuracy", "acc"),
    ("motion_score", "motion"),
    ("fid", "FID"),
    ("inception_score", "IS"),
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
    )


class SampleQuality:
    """Scores samples of a training run's parameters; built once per run (the check runs and
    the Inception-v3 is loaded before the first step)."""

    def __init__(self, config, workdir: pathlib.Path, log):
        self.config, self.log = config, log
        self.e = e = config.eval
        self.num = int(e.num_samples)
        self.every = int(e.every)
        self.inception = self.stats = None
        if not self.num:
            return
        cfg = model_config(config)
        quality.class_labels(cfg, self.num)  # labelled or unconditional: text models are scored by `eval --prompts`
        self.digits = quality.is_digits(config, cfg)
        if self.digits:
            self.classifier = (
                pathlib.Path(e.classifier) if e.classifier else pathlib.Path(workdir) / "digits_classifier.npz"
            )
            return
        if not e.inception_weights:
            raise ConfigError(
                "eval.num_samples on a model of other data than the embedded digits needs eval.inception_weights "
                "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth) and, for FID, eval.stats"
            )
        if cfg.in_channels not in (1, 3) or cfg.temporal_causal or int(config.data.get("num_frames", 0) or 0):
            raise ConfigError(
                f"eval during training scores pixel images (1 or 3 channels); this model has {cfg.in_channels} "
                "channels or frames: score its decoded samples with `starflow-jax eval` instead"
            )
        from starflow_jax.evaluate.frechet import load_statistics
        from starflow_jax.evaluate.inception import load_fid_inception

        self.stats = load_statistics(e.stats) if e.stats else None
        self.inception = load_fid_inception(e.inception_weights)

    def due(self, step: int, total: int) -> bool:
        return bool(self.num) and (step == total or (self.every > 0 and step % self.every == 0))

    def __call__(self, graphdef, params) -> dict:
        """The scores of ``eval.num_samples`` samples of ``params`` (host arrays, every
        process's full copy): process 0 samples and scores, the others get ``{}``."""
        if jax.process_index() != 0:
            return {}
        e, config = self.e, self.config
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
        labels = quality.class_labels(model.cfg, self.num)
        parts: dict[int, np.ndarray] = {}
        quality.sample_batches(
            model,
            config,
            range(math.ceil(self.num / int(e.batch_size))),
            num=self.num,
            batch_size=int(e.batch_size),
            seed=int(e.seed),
            opts=preview_options(config, float(e.cfg)),
            conditioning=quality.label_conditioning(model.cfg, labels),
            temperature=float(e.temperature),
            noise=TrainingNoise.from_config(config),
            denoise=bool(config.sample.denoise),
            quantize=bool(config.sample.denoise),
            save=parts.__setitem__,
        )
        samples = np.concatenate([parts[i] for i in sorted(parts)])
        if self.digits:
            scores = quality.digits_quality(config, samples, labels, self.classifier, log=self.log)
        else:
            from starflow_jax.evaluate.scores import inception_features, inception_scores
            from starflow_jax.sampling.visualize import to_uint8

            pool, logits = inception_features(self.inception, to_uint8(samples, pixel_space=True))
            scores = inception_scores(pool, logits, self.stats, splits=int(e.is_splits))
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}

    @staticmethod
    def describe(scores: dict) -> str:
        """``digits FD 3.05  acc 0.899`` (the scores a log line shows)."""
        return "  ".join(f"{name} {scores[k]:.3f}" for k, name in _SHOWN if k in scores)
