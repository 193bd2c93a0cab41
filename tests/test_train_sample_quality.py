"""Sample quality measured during training (``config.eval``): the scores land in the logged
rows, TensorBoard and result.json, equal what ``starflow-jax eval`` gives on the same
parameters with the same settings, and bad eval settings are refused before the workdir."""

import json

import pytest
from fast_run import FAST, TINY, quiet

from starflow_jax.cli.main import main
from starflow_jax.config import ConfigError, load_config
from starflow_jax.evaluate import digits_classifier as dc
from starflow_jax.train.loop import train
from starflow_jax.train.metrics_writer import read_scalars


@pytest.fixture
def small_classifier(tmp_path):
    cache = tmp_path / "classifier.npz"
    dc.save_classifier(cache, dc.train_digits_classifier(dc.TrainingSettings(steps=5)), dc.TrainingSettings())
    return cache


@pytest.mark.slow  # a training run, its samples scored twice, then eval on its checkpoint: about a minute
def test_training_scores_its_samples_as_eval_does(tmp_path, small_classifier, capsys):
    workdir = tmp_path / "run"
    settings = [f"eval.classifier={small_classifier}", "eval.num_samples=12", "eval.batch_size=5", "eval.every=3"]
    config = load_config(TINY, FAST + settings)
    result = train(config, workdir, log=print)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in rows if "digits_fd" in r}
    assert sorted(scored) == [3, 6]  # every 3 steps, the last one included
    for key in ("digits_fd", "digits_fd_heldout", "accuracy"):
        assert result[key] == scored[6][key]
    assert scored[3]["digits_fd"] != scored[6]["digits_fd"]  # other parameters, other samples
    assert scored[3]["digits_fd_heldout"] == scored[6]["digits_fd_heldout"]  # the floor: real data only
    printed = capsys.readouterr().out
    assert "digits FD" in printed and "samples: digits FD" in printed

    # the same samples and scores from `eval` on the final checkpoint with the same settings
    # (config.sample's Jacobi settings, denoised and rounded to the levels, temperature 1, no guidance)
    s = config.sample
    out = tmp_path / "eval.json"
    args = ["eval", "--workdir", str(workdir), "--out", str(out), "--classifier", str(small_classifier)]
    args += ["--num", "12", "--batch-size", "5", "--jacobi", "--jacobi-block-size", "16", "--quantize"]
    args += ["--jacobi-th", str(s.jacobi_th), "--jacobi-max-iter", str(s.jacobi_max_iter)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())["metrics"]
    for key in ("digits_fd", "accuracy"):
        assert metrics[key] == pytest.approx(result[key], rel=1e-6, abs=1e-9), key

    scalars = read_scalars(workdir / "tensorboard")
    assert scalars["train/digits_fd"] == [
        (3, pytest.approx(scored[3]["digits_fd"])),
        (6, pytest.approx(result["digits_fd"])),
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.num_samples=1"], "eval.num_samples must be 0"),
        (["eval.num_samples=10", "eval.every=3", "train.log_every=2"], "multiple of train.log_every"),
        (["eval.every=2"], "needs eval.num_samples"),
        (["eval.stats=/x.npz"], "needs eval.inception_weights"),
        (["eval.cfg=-1.0"], "eval.cfg must be a number"),
        (["sample.jacobi_policy=greedy"], "sample.jacobi_policy must be"),
        (["sample.jacobi_init=previous"], "sample.jacobi_init='previous' needs sample.jacobi_policy='adaptive'"),
        (["eval.num_samples=10", "data.name=image_folder", "data.root=/nonexistent"], None),
    ],
)
def test_bad_eval_settings_are_refused_before_the_workdir(tmp_path, overrides, message):
    config = load_config(TINY, FAST + overrides)
    with pytest.raises((ConfigError, ValueError, FileNotFoundError)) as e:
        train(config, tmp_path / "run", log=quiet)
    if message:
        assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_model_of_other_data_needs_the_inception_weights(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / "imgs" / c / f"{i}.png")
    overrides = ["eval.num_samples=10", "data.name=image_folder", f"data.root={tmp_path / 'imgs'}", "model.txt_dim=3"]
    config = load_config(TINY, FAST + overrides)
    with pytest.raises(ConfigError, match="needs eval.inception_weights"):
        train(config, tmp_path / "run", log=quiet)
    config = load_config(TINY, FAST + overrides + [f"eval.inception_weights={tmp_path / 'missing.pth'}"])
    with pytest.raises((FileNotFoundError, ValueError), match="missing.pth"):
        train(config, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
