"""A sampling policy per flow block (``SamplingOptions.jacobi_blocks``), the adaptive
window's previous-frame starting point, and the calibration that proposes policies under
an error budget (``bench jacobi --propose``) and saves them into a workdir's config."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_video_sampling import make, normal, rel

from starflow_jax.bench.jacobi_calibration import Measured, choose, propose, save_proposal
from starflow_jax.config import ConfigError
from starflow_jax.sampling import SamplingOptions, block_policies, sample
from starflow_jax.sampling.block_policies import BlockPolicy

IMAGE = dict(
    img_size=4,
    num_blocks=2,
    layers_per_block=(1, 2),
    temporal_causal=0,
    shallow_block_local=False,
    local_attn_window=None,
)


def test_text_round_trip_and_defaults():
    text = "adaptive,window=64,th=0.01,init=previous; blockwise,window=16,th=0.001,max_iter=8; sequential"
    policies = block_policies.parse(text)
    assert policies == (
        BlockPolicy("adaptive", window=64, th=0.01, init="previous"),
        BlockPolicy("blockwise", window=16, th=0.001, max_iter=8),
        BlockPolicy("sequential"),
    )
    assert block_policies.parse(block_policies.text(policies)) == policies
    assert block_policies.parse("") == () and block_policies.parse(" ; ") == ()


@pytest.mark.parametrize(
    "text, match",
    [
        ("greedy", "block policy must be one of sequential, blockwise, adaptive"),
        ("adaptive,size=4", "is not key=value with a key of window, th, max_iter, init"),
        ("adaptive,window", "is not key=value"),
        ("adaptive,window=four", "window='four' is not a int"),
        ("adaptive,window=0", "window must be >= 1"),
        ("adaptive,th=-1", "th must be >= 0"),
        ("adaptive,init=last", "init must be one of noise, zeros, previous"),
    ],
)
def test_bad_policy_text_is_named(text, match):
    with pytest.raises(ValueError, match=match):
        block_policies.parse(text)


def test_each_block_follows_its_own_policy():
    model = make(0, **IMAGE)
    noise, y = normal((2, 2, 4, 4), 1), normal((2, 3, 5), 2)
    seq, p_seq = sample(model, noise, y, SamplingOptions(), return_passes=True)
    # deep block adaptive at threshold 0 (exact), shallow block sequential
    opts = SamplingOptions(jacobi_blocks=(BlockPolicy("adaptive", window=16, th=0.0), BlockPolicy("sequential")))
    x, passes = sample(model, noise, y, opts, return_passes=True)
    assert rel(x, seq) < 1e-5 and passes[1] == p_seq[1] == 16 and passes[0] <= 16, passes
    # the same policies the other way round: the deep block now makes all its 16 passes
    opts = SamplingOptions(jacobi_blocks=(BlockPolicy("sequential"), BlockPolicy("adaptive", window=16, th=10.0)))
    x, passes = sample(model, noise, y, opts, return_passes=True)
    assert passes[0] == 16 and passes[1] == 1, passes  # a threshold of 10: one pass fixes every token
    assert rel(x, seq) > 1e-3  # ... and is not exact
    # global settings fill what a block policy leaves out
    opts = SamplingOptions(jacobi_th=0.0, jacobi_block_size=16, jacobi_blocks=(BlockPolicy("adaptive"),) * 2)
    x, _ = sample(model, noise, y, opts, return_passes=True)
    assert rel(x, seq) < 1e-5


def test_a_policy_count_other_than_the_blocks_is_named():
    model = make(0, **IMAGE)
    noise, y = normal((1, 2, 4, 4), 1), normal((1, 3, 5), 2)
    with pytest.raises(ValueError, match="1 block policies .* for a model of 2 flow blocks"):
        sample(model, noise, y, SamplingOptions(jacobi_blocks=(BlockPolicy("sequential"),)))


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["noguide", "cfg"])
def test_previous_frame_start_at_threshold_zero_is_sequential(guidance):
    model = make(3)
    b, t = 2, 6  # 6 frames of 4 tokens through a 3-frame window, the first frame given
    noise, y = normal((b, t, 2, 2, 2), 4), normal((b, 3, 5), 5)
    y_in = jnp.concatenate([y, jnp.zeros_like(y)]) if guidance else y
    first = normal((b, 1, 2, 2, 2), 6)
    seq, p_seq = sample(model, noise, y_in, SamplingOptions(guidance=guidance), given=first, return_passes=True)
    opts = SamplingOptions(
        guidance=guidance,
        jacobi=True,
        jacobi_policy="adaptive",
        jacobi_block_size=4,
        jacobi_th=0.0,
        jacobi_init="previous",
    )
    x, passes = sample(model, noise, y_in, opts, given=first, return_passes=True)
    np.testing.assert_array_equal(np.asarray(x[:, :1]), np.asarray(first))
    assert rel(x, seq) < 1e-5 and all(a <= s for a, s in zip(passes, p_seq)), (passes, p_seq)


def test_previous_frame_start_changes_the_first_iterate():
    """One pass per window (a threshold that accepts every token): the result is the first
    iterate's image, so starting from the previous frame must give another result than
    starting from the noise, and the first frame (nothing earlier) the same."""
    model = make(3)
    noise, y = normal((2, 4, 2, 2, 2), 7), normal((2, 3, 5), 8)

    def one_pass(init):
        policy = BlockPolicy("adaptive", window=4, th=1e9, init=init)
        return sample(model, noise, y, SamplingOptions(jacobi_blocks=(policy,) + (BlockPolicy("sequential"),) * 2))

    a, b = one_pass("noise"), one_pass("previous")
    assert rel(a[:, 1:], b[:, 1:]) > 1e-3
    np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(b[:, 0]), rtol=1e-5, atol=1e-6)


def test_previous_start_needs_the_adaptive_policy():
    model = make(3)
    noise, y = normal((1, 4, 2, 2, 2), 7), normal((1, 3, 5), 8)
    with pytest.raises(ValueError, match="'previous' is the adaptive policy's"):
        sample(model, noise, y, SamplingOptions(jacobi=True, jacobi_init="previous"))


def _m(name, passes, error):
    return Measured(BlockPolicy("adaptive", window=passes, th=error), passes, error)


def test_choose_takes_the_fewest_passes_within_the_budget():
    deep = [_m("seq", 16, 0.0), _m("a", 10, 0.01), _m("b", 6, 0.05)]
    shallow = [_m("seq", 16, 0.0), _m("c", 3, 0.004), _m("d", 1, 0.2)]
    assert [m.passes for m in choose([deep, shallow], 0.011)] == [10, 3]  # sqrt(0.01^2 + 0.004^2) = 0.0108
    assert [m.passes for m in choose([deep, shallow], 0.0105)] == [16, 3]
    assert [m.passes for m in choose([deep, shallow], 1.0)] == [6, 1]
    assert choose([[_m("x", 3, 0.5)]], 0.1) is None


def test_propose_tightens_the_budget_when_the_whole_run_exceeds_it():
    deep = [_m("seq", 16, 0.0), _m("a", 10, 0.01)]
    calls = []

    def run(policies):  # the combination's real error is twice the per-block estimate
        calls.append(policies)
        err = 2 * sum(p.th**2 for p in policies) ** 0.5
        return [p.window for p in policies], err

    policies, passes, err = propose([deep], 0.015, run)
    assert passes == [16] and err == 0 and len(calls) == 2  # 10 passes measured 0.02 > 0.015: tightened
    assert propose([[_m("a", 10, 0.01)]], 0.015, run) is None


def test_save_proposal_writes_the_config_and_keeps_the_old_one(tmp_path):
    from starflow_jax.config import load_config
    from starflow_jax.workdir.layout import config_json, read_workdir_config

    config = load_config("configs/tiny_cpu.py")
    (tmp_path / "config.json").write_text(config_json(config))
    policies = block_policies.parse("adaptive,window=16,th=0.1; sequential; blockwise")
    text = save_proposal(tmp_path, policies, dict(error=0.01))
    assert read_workdir_config(tmp_path).sample.jacobi_blocks == text == block_policies.text(policies)
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["config"]["sample"].get("jacobi_blocks", "") == "" and history[-1]["error"] == 0.01
    with pytest.raises(ValueError, match="2 block policies .* 3 flow blocks"):
        save_proposal(tmp_path, policies[:2], {})


def test_a_resumed_run_keeps_the_saved_policies_unless_its_command_sets_others(tmp_path):
    """`train` again on a workdir (a resume) with a command that leaves sample.jacobi_blocks
    at its default keeps what `bench jacobi --save` wrote, and says so; one that sets other
    policies replaces them (the replaced config goes to config_history.jsonl)."""
    from starflow_jax.config import load_config
    from starflow_jax.workdir import run as wd
    from starflow_jax.workdir.layout import config_json, read_workdir_config

    (tmp_path / "config.json").write_text(config_json(load_config("configs/tiny_cpu.py")))
    saved = save_proposal(tmp_path, block_policies.parse("adaptive,window=16,th=0.1; sequential; blockwise"), {})
    logs = []
    config = load_config("configs/tiny_cpu.py", ["train.steps=50"])
    wd.prepare(tmp_path, config, overwrite=False, log=logs.append)
    assert config.sample.jacobi_blocks == saved == read_workdir_config(tmp_path).sample.jacobi_blocks
    assert any("sample.jacobi_blocks" in line and "kept from the workdir" in line for line in logs), logs
    other = "sequential; sequential; sequential"
    wd.prepare(tmp_path, load_config("configs/tiny_cpu.py", [f"sample.jacobi_blocks={other}"]), False, logs.append)
    assert read_workdir_config(tmp_path).sample.jacobi_blocks == other
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["config"]["sample"]["jacobi_blocks"] == saved


def test_config_checks_the_block_policies():
    from starflow_jax.config import load_config
    from starflow_jax.config.training import check_training_config

    config = load_config("configs/tiny_cpu.py", ["sample.jacobi_blocks=adaptive; sequential; blockwise"])
    check_training_config(config)
    for setting, match in [
        ("sample.jacobi_blocks=adaptive; sequential", "gives 2 policies for model.num_blocks=3"),
        ("sample.jacobi_blocks=adaptive,th=x; sequential; sequential", "sample.jacobi_blocks: .*th='x'"),
        ("sample.jacobi_init=previous", "needs sample.jacobi_policy='adaptive'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_training_config(load_config("configs/tiny_cpu.py", [setting]))
