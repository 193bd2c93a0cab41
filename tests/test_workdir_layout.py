"""The workdir's writer (a training run's checkpoints) and its readers (sample, export,
fine-tuning) take its names from one place, ``workdir.layout``: a test here fails when
the train state's fields and the names the readers take drift apart."""

import dataclasses

import jax
import numpy as np
import optax
from fast_run import FAST, TINY
from flax import nnx

from starflow_jax.config import load_config, model_config
from starflow_jax.model import StarFlow
from starflow_jax.train.step import TrainState, init_state
from starflow_jax.workdir import checkpoints, layout
from starflow_jax.workdir.params import load_params


def test_the_train_state_holds_the_fields_the_readers_take():
    fields = {f.name for f in dataclasses.fields(TrainState)}
    assert {layout.PARAMS_KEY, layout.EMA_KEY} <= fields


def test_params_and_ema_saved_with_the_train_state_read_back(tmp_path):
    config = load_config(TINY, FAST + ["train.ema_decay=0.9"])
    (tmp_path / layout.CONFIG).write_text(layout.config_json(config))
    state = init_state(StarFlow(model_config(config), rngs=nnx.Rngs(0)), optax.sgd(0.1), seed=0, ema=True)
    state = state.replace(ema=jax.tree.map(lambda a: a + 1.0, state.ema))  # told apart from the params
    mgr = checkpoints.manager(tmp_path / layout.CHECKPOINTS, keep=1, every=1)
    assert checkpoints.save(mgr, 1, state, {"step": 1}, force=True)
    mgr.wait_until_finished()
    mgr.close()
    assert sorted(p.name for p in (tmp_path / layout.CHECKPOINTS / "1").iterdir() if p.is_dir()) == [
        layout.DATA_ITEM,
        layout.INTEGRITY_ITEM,
        layout.STATE_ITEM,
    ]
    for ema, want in ((False, state.params), (True, state.ema)):
        _, _, got = load_params(tmp_path, ema=ema, log=print)
        want_leaves, got_leaves = jax.tree.leaves(want), jax.tree.leaves(got)
        assert len(got_leaves) == len(want_leaves) > 0
        for a, b in zip(got_leaves, want_leaves):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
