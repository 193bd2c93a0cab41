"""``starflow-jax eval``: a briefly trained digits workdir scored (digits FD, accuracy; the
numbers recomputed from the saved samples), random-init models, and bad arguments."""

import json

import numpy as np
import pytest
from fast_run import FAST, TINY

from starflow_jax.cli.evaluate import format_table
from starflow_jax.cli.main import main
from starflow_jax.evaluate import digits_classifier as dc
from starflow_jax.evaluate.quality import batch_seed
from starflow_jax.evaluate.scores import digits_scores, spread_labels

FAST_SET = sum((["--set", o] for o in FAST), [])


@pytest.mark.slow  # a few minutes on two CPU cores: a 6-step training, the classifier, three evaluations
def test_eval_of_a_trained_digits_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", "--config", str(TINY), "--workdir", str(workdir)] + FAST_SET) == 0
    capsys.readouterr()
    npy = tmp_path / "x.npy"
    args = ["eval", "--workdir", str(workdir), "--num", "25", "--batch-size", "10", "--save-npy", str(npy)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_samples"] == 25 and result["source"] == str(workdir)
    assert result["options"]["denoise"] and not result["options"]["quantize"]
    metrics = result["metrics"]
    assert metrics["classifier"] == str(workdir / dc.CACHE_NAME)
    samples, labels = np.load(npy), np.load(tmp_path / "x.labels.npy")
    assert samples.shape == (25, 1, 8, 8)
    np.testing.assert_array_equal(labels, np.arange(25) % 10)
    want = digits_scores(dc.load_classifier(workdir / dc.CACHE_NAME), np.clip(samples, -1, 1), labels)
    for key in ("digits_fd", "digits_fd_heldout", "accuracy"):
        assert metrics[key] == pytest.approx(want[key], rel=1e-9), key
    assert metrics["digits_fd"] > metrics["digits_fd_heldout"]  # 6 training steps do not draw digits
    assert "digits FD (vs train split)" in printed and "class accuracy" in printed
    # the batches draw different noise; a second run reuses the cached classifier, --overwrite needed
    assert len({batch_seed(0, i) for i in range(3)}) == 3
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--quantize", "--seed", "1"]) == 0
    assert "retraining" not in capsys.readouterr().err
    quantized = np.load(npy)
    levels = (quantized + 1) / 2 * 16
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
    assert json.loads((workdir / "eval.json").read_text())["options"]["quantize"]


@pytest.mark.slow
def test_eval_of_a_random_model_with_a_cached_classifier(tmp_path, capsys):
    """The fast path: the classifier cache is trusted (here a 5-step one filed under the
    default settings, so that nothing trains), samples of a random model scored from it."""
    cache = tmp_path / "classifier.npz"
    dc.save_classifier(cache, dc.train_digits_classifier(dc.TrainingSettings(steps=5)), dc.TrainingSettings())
    out, npy = tmp_path / "e.json", tmp_path / "x.npy"
    args = ["eval", "--config", str(TINY), "--random-init", "--num", "10", "--batch-size", "10", "--cfg", "1.0"]
    png = tmp_path / "grid.png"
    extra = ["--out", str(out), "--classifier", str(cache), "--save-npy", str(npy), "--grid", str(png)]
    assert main(args + FAST_SET + extra + ["--grid-scale", "1"]) == 0
    from PIL import Image

    from starflow_jax.sampling.visualize import to_uint8

    picture, samples = np.asarray(Image.open(png)), to_uint8(np.load(npy), pixel_space=True)
    assert picture.shape == (9 + 1, 10 * 9 + 1)  # one row of 10 cells of 8x8, 1-pixel padding
    for i in range(10):
        np.testing.assert_array_equal(picture[1:9, 1 + 9 * i : 9 + 9 * i], samples[i, ..., 0])
    metrics = json.loads(out.read_text())["metrics"]
    want = digits_scores(dc.load_classifier(cache), np.clip(np.load(npy), -1, 1), np.load(tmp_path / "x.labels.npy"))
    assert metrics["digits_fd"] == pytest.approx(want["digits_fd"], rel=1e-9)
    assert metrics["accuracy"] == pytest.approx(want["accuracy"])
    assert json.loads(out.read_text())["options"]["cfg"] == 1.0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num", "1"], "--num must be >= 2"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--cfg", "-1"], "--cfg must be >= 0"),
        (["--stats", "s.npz"], "--stats needs --inception-weights"),
        ([], "--out is required unless --workdir"),
        (["--out", "e.json", "--grid", "g.jpg"], "--grid writes a .png"),
    ],
)
def test_eval_bad_arguments(extra, message, capsys):
    assert main(["eval", "--config", str(TINY), "--random-init"] + extra) == 2
    assert message in capsys.readouterr().err


def test_eval_of_other_models_needs_inception_weights(tmp_path, capsys):
    args = ["eval", "--config", str(TINY), "--random-init", "--set", "data.name=image_folder"]
    assert main(args + ["--out", str(tmp_path / "e.json")]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    missing = tmp_path / "nope.pth"
    assert main(args + ["--out", str(tmp_path / "e.json"), "--inception-weights", str(missing), "--num", "2"]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err


def test_spread_labels_and_table():
    np.testing.assert_array_equal(np.bincount(spread_labels(30, 10)), [3] * 10)
    table = format_table({"digits_fd": 1.5, "accuracy": 0.25, "classifier": "x.npz"})
    assert table.splitlines() == [
        "digits FD (vs train split)          1.5000",
        "class accuracy (digits classifier)  0.2500",
    ]


def _random_eval(tmp_path, cache, out, *extra):
    return (
        ["eval", "--config", str(TINY), "--random-init", "--num", "30", "--batch-size", "10"]
        + FAST_SET
        + ["--out", str(out), "--classifier", str(cache), *extra]
    )


@pytest.fixture
def small_classifier(tmp_path):
    cache = tmp_path / "classifier.npz"
    dc.save_classifier(cache, dc.train_digits_classifier(dc.TrainingSettings(steps=5)), dc.TrainingSettings())
    return cache


def test_an_interrupted_eval_continues_and_gives_the_same_result(tmp_path, small_classifier, capsys, monkeypatch):
    from starflow_jax.evaluate import quality
    from starflow_jax.evaluate.batch_store import parts_dir

    whole = tmp_path / "whole.json"
    assert main(_random_eval(tmp_path, small_classifier, whole, "--save-npy", str(tmp_path / "w.npy"))) == 0
    assert not parts_dir(whole).exists()  # the kept batches go once the result is written

    real, calls = quality.generate, []

    def dies_at_the_third_batch(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it: two batches kept, no result
        return real(*args, **kwargs)

    out = tmp_path / "cut.json"
    args = _random_eval(tmp_path, small_classifier, out, "--save-npy", str(tmp_path / "c.npy"))
    monkeypatch.setattr(quality, "generate", dies_at_the_third_batch)
    assert main(args) == 130  # Ctrl-C's exit status
    assert not out.exists() and sorted(p.name for p in parts_dir(out).glob("batch_*")) == [
        "batch_00000.npz",
        "batch_00001.npz",
    ]
    calls.clear()
    monkeypatch.setattr(quality, "generate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    capsys.readouterr()
    assert main(args) == 0
    assert len(calls) == 1 and "2 of 3 batches already done" in capsys.readouterr().err  # only the missing one
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.load(tmp_path / "w.npy"))
    assert json.loads(out.read_text())["metrics"] == json.loads(whole.read_text())["metrics"]


def test_kept_batches_of_other_settings_are_refused_and_overwrite_starts_over(tmp_path, small_classifier, capsys):
    from starflow_jax.evaluate.batch_store import BatchStore, parts_dir

    out = tmp_path / "e.json"
    BatchStore(parts_dir(out), {"seed": 7}).save(0, {"samples": np.zeros((10, 1, 8, 8), np.float32)})
    assert main(_random_eval(tmp_path, small_classifier, out)) == 2
    err = capsys.readouterr().err
    assert "holds the batches of an eval with other settings" in err and "seed: 7 there, 0 now" in err
    assert main(_random_eval(tmp_path, small_classifier, out, "--overwrite")) == 0
    assert out.exists() and not parts_dir(out).exists()


@pytest.mark.slow  # two processes joining jax.distributed, each compiling the sampler
def test_two_processes_share_the_batches_and_give_the_one_process_result(tmp_path, small_classifier):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    one = tmp_path / "one.json"
    assert main(_random_eval(tmp_path, small_classifier, one)) == 0
    two = tmp_path / "two.json"
    dist = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    cmd = [sys.executable, "-m", "starflow_jax.cli.main", *_random_eval(tmp_path, small_classifier, two, *dist)]
    procs = [
        subprocess.Popen(
            cmd + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    assert "sampled batch 2/3" in outs[1][1] and "sampled batch 2/3" not in outs[0][1]  # batch 1 on process 1
    assert json.loads(two.read_text())["metrics"] == json.loads(one.read_text())["metrics"]


@pytest.mark.slow  # a second process with two CPU devices compiling the sampler
def test_batches_split_over_the_devices_give_the_one_device_samples(tmp_path, small_classifier):
    """Each batch is split over the process's devices (here 2 CPU devices; batch size 10
    divides, the last batch of 5 of --num 25 does not and runs unsplit): the same samples
    and scores as on one device."""
    import os
    import subprocess
    import sys

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert (
        main(_random_eval(tmp_path, small_classifier, one, "--num", "25", "--save-npy", str(tmp_path / "1.npy"))) == 0
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = _random_eval(tmp_path, small_classifier, two, "--num", "25", "--save-npy", str(tmp_path / "2.npy"))
    code = "import jax, sys; assert jax.local_device_count() == 2; from starflow_jax.cli.main import main; "
    code += "sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each batch split over 2 devices" in proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "2.npy"), np.load(tmp_path / "1.npy"), rtol=1e-5, atol=1e-5)
    got, want = json.loads(two.read_text())["metrics"], json.loads(one.read_text())["metrics"]
    for key in ("digits_fd", "accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_eval_of_a_moving_digits_model_scores_every_frame_and_the_motion(tmp_path, small_classifier):
    from starflow_jax.config import load_config
    from starflow_jax.data.moving_digits import motion_score
    from starflow_jax.data.sources import make_data

    video = TINY.parent / "video_tiny_cpu.py"
    out, npy = tmp_path / "v.json", tmp_path / "v.npy"
    args = ["eval", "--config", str(video), "--random-init", "--set", "model.channels=32", "--num", "4"]
    args += ["--batch-size", "2", "--out", str(out), "--classifier", str(small_classifier), "--save-npy", str(npy)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())["metrics"]
    clips, labels = np.load(npy), np.load(tmp_path / "v.labels.npy")
    assert clips.shape == (4, 4, 1, 8, 8)
    frames = np.clip(clips.reshape(-1, 1, 8, 8), -1, 1)
    data = make_data(load_config(video, ["model.channels=32"]))
    real = (data.train_images.reshape(-1, 1, 8, 8), data.heldout_images.reshape(-1, 1, 8, 8))
    want = digits_scores(dc.load_classifier(small_classifier), frames, np.repeat(labels, 4), real=real)
    assert metrics["digits_fd_heldout"] == pytest.approx(want["digits_fd_heldout"], rel=1e-9)  # frames of clips
    assert metrics["digits_fd"] == pytest.approx(want["digits_fd"], rel=1e-9)
    assert metrics["accuracy"] == pytest.approx(want["accuracy"])
    assert metrics["motion_score"] == pytest.approx(motion_score(clips), rel=1e-9)
    assert metrics["motion_score_real"] == 0.0 and metrics["motion_score_shuffled"] > 0.05
    # unrounded samples of a uniformly dequantising run: the floor an exact model reaches
    assert metrics["motion_score_real_dequantised"] == pytest.approx(1 / (3 * 17), rel=0.1)
    assert 0 < metrics["accuracy_real"] <= 1
    # rounded to the levels (--quantize): the real clips' 0 is that floor
    assert main([*args, "--quantize", "--overwrite"]) == 0
    assert "motion_score_real_dequantised" not in json.loads(out.read_text())["metrics"]


def test_eval_refuses_other_video_models(tmp_path, capsys):
    video = TINY.parent / "video_tiny_cpu.py"
    args = ["eval", "--config", str(video), "--random-init", "--set", "data.name=array_record", "--out", "x.json"]
    assert main(args + ["--inception-weights", str(tmp_path / "w.pth")]) == 2
    assert "moving-digits clips; this is another video model" in capsys.readouterr().err
