"""Workdirs and data on object storage (``gs://``), against a local GCS emulator: training
writes its checkpoints, metrics, TensorBoard events, pictures and result there, resumes from
there, sets checkpoints aside there; ``load_params`` (sample / nll / export) reads it; ArrayRecord
shards under a ``gs://`` prefix are read through a local copy."""

import json
import os
import pathlib

import numpy as np
import pytest
from fast_run import FAST, ROOT, TINY, quiet
from gcs_emulator import BUCKET, gcs_emulator

from starflow_jax import storage


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, with this process's environment pointed at it."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs") / "emulator.log") as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # (one made before would keep another endpoint)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            gcsfs.GCSFileSystem.clear_instance_cache()


def _rows(workdir):
    return [json.loads(line) for line in (storage.as_path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir, sub="checkpoints"):
    d = storage.as_path(workdir) / sub
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_workdir_files_on_gcs_without_training(gcs):
    """The workdir's own files on gs:// (fast: no training): config.json and the replaced
    config's history, metrics rows kept across writers and truncated, TensorBoard events,
    a PNG, a step set aside, and no lock."""
    from starflow_jax.config import load_config
    from starflow_jax.sampling.visualize import save_png
    from starflow_jax.train.metrics_writer import MetricsWriter
    from starflow_jax.workdir import checkpoints
    from starflow_jax.workdir import run as wd

    root = storage.as_path(f"gs://{BUCKET}/files")
    wd.WorkdirLock(root).release()
    wd.prepare(root, load_config(TINY, FAST), overwrite=False, log=quiet)
    logs = []
    wd.prepare(root, load_config(TINY, FAST + ["train.steps=7"]), overwrite=False, log=logs.append)
    assert json.loads((root / "config.json").read_text())["train"]["steps"] == 7
    assert len((root / "config_history.jsonl").read_text().splitlines()) == 1 and "train.steps" in logs[0]
    for steps in ([1, 2], [3, 4]):  # a second writer (a resumed run) keeps the first one's rows
        writer = MetricsWriter(root)
        for step in steps:
            writer.write(step, dict(step=step, loss=1.0 / step))
        writer.close()
    assert [r["step"] for r in _rows(root)] == [1, 2, 3, 4]
    assert wd.truncate_metrics(root, 2) == 2 and [r["step"] for r in _rows(root)] == [1, 2]
    assert len([p for p in (root / "tensorboard").iterdir() if "tfevents" in p.name]) >= 1
    save_png(root / "samples.png", np.zeros((4, 4, 1), np.uint8))
    assert (root / "samples.png").read_bytes()[:4] == b"\x89PNG"
    (root / "checkpoints" / "3" / "state").mkdir(parents=True, exist_ok=True)
    (root / "checkpoints" / "3" / "state" / "_METADATA").write_text("{}")
    assert not wd.has_checkpoints(root)  # a step orbax did not finish writing there (no commit_success.txt)
    (root / "checkpoints" / "3" / "commit_success.txt").write_text("")
    assert wd.has_checkpoints(root)
    dst = checkpoints.set_aside(root, 3)
    assert os.fspath(dst) == f"gs://{BUCKET}/files/checkpoints_set_aside/3"
    assert (dst / "state" / "_METADATA").read_text() == "{}" and not (root / "checkpoints" / "3").exists()
    assert os.fspath(checkpoints.set_aside(root, 3)).endswith("checkpoints_set_aside/3.1")  # never replaced
    assert not list(root.glob(".lock.*"))
    wd.prepare(root, load_config(TINY, FAST), overwrite=True, log=quiet)  # --overwrite: the run's files go
    assert sorted(p.name for p in root.iterdir()) == ["config.json"]


@pytest.mark.slow
def test_a_run_on_gcs_writes_everything_there_resumes_and_is_read_back(gcs):
    from starflow_jax.config import load_config
    from starflow_jax.train.loop import train
    from starflow_jax.workdir.params import load_params

    workdir = f"gs://{BUCKET}/fast"
    run = FAST + ["train.profile=[2, 1]"]  # (a profile of step 2, uploaded to WORKDIR/profile)
    out = train(load_config(TINY, run), workdir, log=quiet, stop_after=3)
    assert out["stopped"] and max(map(int, _steps(workdir))) == 3
    logs = []
    train(load_config(TINY, run), workdir, log=logs.append)
    assert any("resumed from gs://bucket/fast/checkpoints at step 3" in line for line in logs), logs
    wd = storage.as_path(workdir)
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5, 6]
    assert {"3", "6"} <= set(_steps(workdir))
    assert json.loads((wd / "result.json").read_text())["steps"] == 6
    assert (wd / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (wd / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents.")]
    assert not list(wd.glob(".lock.*"))  # not locked there
    assert [p for p in storage.as_path(workdir).glob("profile/plugins/profile/*/*") if "xplane" in p.name]
    # a resumed run with a changed config (more steps) back at step 3: config_history, set-aside
    train(load_config(TINY, run + ["train.steps=7"]), workdir, log=quiet, step=3)
    assert {"3", "6", "7"} <= set(_steps(workdir))  # (6 written again by the resumed run)
    assert _steps(workdir, "checkpoints_set_aside") == ["6"]
    assert (wd / "checkpoints_set_aside" / "6" / "state" / "_METADATA").exists()
    assert len((wd / "config_history.jsonl").read_text().splitlines()) == 1
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5, 6, 7]
    _, cfg, params = load_params(workdir)
    import jax

    assert cfg.channels == 32 and all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(params))
    from starflow_jax.cli.main import main

    assert main(["nll", "--workdir", workdir, "--step", "6"]) == 0  # the held-out digits under step 6


def test_outputs_to_gcs_are_refused_in_one_line(tmp_path):
    from starflow_jax.cli.output_paths import check_outputs

    with pytest.raises(ValueError, match="outputs are written to local files"):
        check_outputs(["gs://b/out.png"], overwrite=False)
    from starflow_jax.config import load_config
    from starflow_jax.interop.formats import import_reference
    from starflow_jax.workdir.layout import CheckpointError

    with pytest.raises(CheckpointError, match="import writes a local workdir"):
        import_reference(tmp_path / "w.pth", load_config(TINY, FAST), "gs://b/imported")
    assert not (tmp_path / "gs:").exists() and not pathlib.Path("gs:").exists()


def test_array_record_shards_on_gcs_are_read_through_a_local_copy(gcs, tmp_path, monkeypatch):
    from starflow_jax.data.array_record import ArrayRecordSource, write_shards

    records = [{"latent": np.full((2, 2), i, np.float32), "caption": f"r{i}"} for i in range(5)]
    write_shards(tmp_path / "shards", records, records_per_shard=2)
    storage.upload_tree(tmp_path / "shards", f"gs://{BUCKET}/latents")
    monkeypatch.setenv("STARFLOW_DATA_CACHE", str(tmp_path / "cache"))
    src = ArrayRecordSource(f"gs://{BUCKET}/latents")
    assert len(src) == 5 and src.index["num_records"] == 5
    assert [float(src[i]["latent"][0, 0]) for i in range(5)] == [0, 1, 2, 3, 4]
    local = tmp_path / "cache" / "gs" / BUCKET / "latents"
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in (tmp_path / "shards").iterdir())
    with pytest.raises(ValueError, match="does not exist"):
        ArrayRecordSource(f"gs://{BUCKET}/nothing")


def _spawn(args, env, **kw):
    import subprocess
    import sys

    env = dict(
        os.environ,
        **env,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        # Generous: on a loaded CI machine a step plus the gs:// checkpoint can take longer than
        # a short grace timer, which would cut the agreed save short (test_run_safety does the same).
        STARFLOW_SIGTERM_GRACE_S="120",
    )
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "starflow_jax.cli.main"] + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


def _train_two(workdir, env, extra):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", "--config", str(TINY), "--workdir", workdir] + sum((["--set", o] for o in FAST + extra), [])
    return [
        _spawn(
            args + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], env
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_two_processes_train_on_gcs_are_stopped_resume_and_sample_and_export_read_it(gcs, tmp_path):
    """The TPU-pod case: every process of a 2-process run writes its shards of the checkpoint
    to gs://; SIGTERM to one stops both at one step with a checkpoint there; the rerun
    resumes from gs:// and finishes; `sample` and `export` read the gs:// workdir."""
    import signal
    import time

    workdir = f"gs://{BUCKET}/two"
    extra = ["train.steps=20", "train.checkpoint_every=1000", "train.log_every=5", "sample.every=0"]
    procs = _train_two(workdir, gcs, extra)
    try:
        lines, t0 = [], time.time()
        while time.time() - t0 < 300:
            line = procs[0].stdout.readline()
            lines.append(line)
            if not line or "step 5/" in line:
                break
        assert "step 5/" in lines[-1], "".join(lines[-30:])
        procs[1].send_signal(signal.SIGTERM)
        outs = ["".join(lines) + procs[0].communicate(timeout=120)[0], procs[1].communicate(timeout=120)[0]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs[0][-2000:] + outs[1][-2000:]
    stop = max(map(int, _steps(workdir)))
    assert 5 <= stop < 20 and f"stopped by SIGTERM after step {stop}" in outs[0], outs[0][-2000:]
    resumed = _train_two(workdir, gcs, extra)
    outs = [p.communicate(timeout=300)[0] for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert f"resumed from {workdir}/checkpoints at step {stop}" in outs[0], outs[0][-2000:]
    assert [r["step"] for r in _rows(workdir)] == [5, 10, 15, 20]
    assert max(map(int, _steps(workdir))) == 20
    assert json.loads((storage.as_path(workdir) / "result.json").read_text())["steps"] == 20

    sample = _spawn(
        ["sample", "--workdir", workdir, "--labels", "0,1", "--num", "2", "--out", str(tmp_path / "s.png")], gcs
    )
    export = _spawn(
        ["export", "--workdir", workdir, "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")], gcs
    )
    for p in (sample, export):
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-2000:]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "m.safetensors").stat().st_size > 0 and (tmp_path / "m.yaml").exists()


def test_training_data_under_a_gcs_prefix(gcs, tmp_path, monkeypatch):
    """``data.path`` / ``data.heldout_path`` = gs:// prefixes: the sources the train loop
    builds (``make_data``) read the shards through the local cache."""
    from starflow_jax.config import data_section, load_config
    from starflow_jax.data.array_record import write_shards
    from starflow_jax.data.sources import make_data

    rng = np.random.default_rng(0)
    records = [
        dict(
            latent=rng.normal(size=(4, 8, 8)).astype(np.float32),
            text_emb=rng.normal(size=(3, 6)).astype(np.float32),
            caption=f"caption {i}",
        )
        for i in range(20)
    ]
    write_shards(tmp_path / "shards", records[:16], records_per_shard=6)
    write_shards(tmp_path / "held", records[16:])
    storage.upload_tree(tmp_path / "shards", f"gs://{BUCKET}/t2i/train")
    storage.upload_tree(tmp_path / "held", f"gs://{BUCKET}/t2i/held")
    monkeypatch.setenv("STARFLOW_DATA_CACHE", str(tmp_path / "cache"))
    config = load_config(TINY, FAST)
    with config.unlocked():
        config.data = data_section(
            name="array_record", path=f"gs://{BUCKET}/t2i/train", heldout_path=f"gs://{BUCKET}/t2i/held"
        )
        config.model.in_channels, config.model.txt_size, config.model.txt_dim = 4, 3, 6
    data = make_data(config)
    assert (len(data.train), len(data.heldout)) == (16, 4)
    np.testing.assert_array_equal(data.heldout[0]["image"], records[16]["latent"])
    np.testing.assert_array_equal(data.train[15]["cond"], records[15]["text_emb"])


def test_aspect_ratio_buckets_under_a_gcs_prefix(gcs, tmp_path, monkeypatch):
    """``data.mix_aspect`` with ``data.path`` a gs:// prefix of bucket folders: each bucket
    is found there and read through the local cache."""
    from starflow_jax.config import data_section, load_config
    from starflow_jax.data.array_record import write_shards
    from starflow_jax.data.sources import make_data

    rng = np.random.default_rng(1)
    for name, (h, w), n in (("1x1", (8, 8), 5), ("16x9", (6, 10), 3)):
        recs = [
            dict(
                latent=rng.normal(size=(4, h, w)).astype(np.float32),
                text_emb=rng.normal(size=(3, 6)).astype(np.float32),
            )
            for _ in range(n)
        ]
        write_shards(tmp_path / name, recs)
        storage.upload_tree(tmp_path / name, f"gs://{BUCKET}/buckets/{name}")
    monkeypatch.setenv("STARFLOW_DATA_CACHE", str(tmp_path / "cache"))
    config = load_config(TINY, FAST)
    with config.unlocked():
        config.data = data_section(name="array_record", path=f"gs://{BUCKET}/buckets", mix_aspect=True)
        config.model.in_channels, config.model.txt_size, config.model.txt_dim = 4, 3, 6
    data = make_data(config)
    assert {b: len(s) for b, s in data.train_buckets.items()} == {"1:1": 5, "16:9": 3}
    assert data.train_buckets["16:9"][2]["image"].shape == (4, 6, 10)
