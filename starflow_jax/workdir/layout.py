"""Every name in a workdir, declared once, and its ``config.json``.

Written by ``starflow-jax train``: ``config.json``, ``checkpoints/<step>/`` (orbax; items
``state`` (the train state: ``params``, ``ema``, optimizer state, ...), ``data`` (the
data iterator's position) and ``integrity`` (fingerprints)), ``checkpoints_set_aside/<step>/``
(unreadable or abandoned steps, kept for the user), ``config_history.jsonl`` (configs a
resumed run replaced), ``metrics.jsonl``, ``tensorboard/``, ``samples*.png``,
``result.json``. Written by ``starflow-jax import``: ``config.json``, ``params/`` and
``params.integrity.json`` (a run trained there starts from those parameters).

A workdir may lie on object storage (``gs://bucket/run``: ``starflow_jax.storage``).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections

from starflow_jax import storage
from starflow_jax.config import with_defaults

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"  # orbax steps of the train state
SET_ASIDE = "checkpoints_set_aside"  # beside checkpoints/: steps moved out of the run, never deleted
IMPORTED_PARAMS = "params"  # the parameters `import` wrote
IMPORTED_INTEGRITY = "params.integrity.json"  # their fingerprints
CONFIG_HISTORY = "config_history.jsonl"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
RESULT = "result.json"
SAMPLES = "samples*.png"  # the preview grids: FINAL_SAMPLES and periodic_samples(step)
FINAL_SAMPLES = "samples.png"


def periodic_samples(step: int) -> str:
    """The preview grid written at ``step`` (``sample.every``)."""
    return f"samples_{step:07d}.png"


# the items of a checkpoint step
STATE_ITEM = "state"
DATA_ITEM = "data"
INTEGRITY_ITEM = "integrity"

# the train state's fields (train.step.TrainState) that hold the parameters and their EMA
PARAMS_KEY = "params"
EMA_KEY = "ema"

# What a workdir holds (``starflow-jax train`` and ``import``): all that ``import --overwrite``
# and ``train --overwrite`` replace; other files in the directory stay.
WORKDIR_ENTRIES = (
    CONFIG,
    IMPORTED_PARAMS,
    IMPORTED_INTEGRITY,
    CHECKPOINTS,
    SET_ASIDE,
    CONFIG_HISTORY,
    METRICS,
    TENSORBOARD,
    RESULT,
    SAMPLES,
)


class CheckpointError(ValueError):
    pass


def config_json(config: ml_collections.ConfigDict) -> str:
    """The text of a workdir's ``config.json``."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


def read_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    path = storage.as_path(workdir) / CONFIG
    if not path.exists():
        raise CheckpointError(f"{workdir} is not a starflow-jax workdir (no config.json)")
    # keys added to the schema since the run was written take their defaults
    return ml_collections.ConfigDict(with_defaults(json.loads(path.read_text())))
