"""Workdirs and data on object storage (``gs://``), against a local GCS emulator: training
writes its checkpoints, metrics, TensorBoard events, pictures and result there, resumes from
there, sets checkpoints aside there; ``load_params`` (sample / nll / export) reads it; ArrayRecord
shards under a ``gs://`` prefix are read through a local copy."""
import json
import os
import pathlib

import numpy as np
import pytest

from starflow_jax import storage
from gcs_emulator import BUCKET, gcs_emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"
FAST = ["model.channels=32", "model.layers_per_block=[1, 0, 1]", "train.batch_size=16", "train.steps=6",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=3",
        "sample.per_class=1", "sample.scale=1"]
quiet = lambda *a, **k: None  # noqa: E731


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


def test_a_run_on_gcs_writes_everything_there_resumes_and_is_read_back(gcs):
    from starflow_jax.config import load_config
    from starflow_jax.interop.checkpoints import load_params
    from starflow_jax.train.loop import train

    workdir = f"gs://{BUCKET}/fast"
    out = train(load_config(TINY, FAST), workdir, log=quiet, stop_after=3)
    assert out["stopped"] and max(map(int, _steps(workdir))) == 3
    logs = []
    train(load_config(TINY, FAST), workdir, log=logs.append)
    assert any("resumed from gs://bucket/fast/checkpoints at step 3" in line for line in logs), logs
    wd = storage.as_path(workdir)
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5, 6]
    assert {"3", "6"} <= set(_steps(workdir))
    assert json.loads((wd / "result.json").read_text())["steps"] == 6
    assert (wd / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (wd / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents.")]
    assert not list(wd.glob(".lock.*"))  # not locked there
    # a resumed run with a changed config (more steps) back at step 3: config_history, set-aside
    train(load_config(TINY, FAST + ["train.steps=7"]), workdir, log=quiet, step=3)
    assert {"3", "6", "7"} <= set(_steps(workdir))  # (6 written again by the resumed run)
    assert _steps(workdir, "checkpoints_set_aside") == ["6"]
    assert (wd / "checkpoints_set_aside" / "6" / "state" / "_METADATA").exists()
    assert len((wd / "config_history.jsonl").read_text().splitlines()) == 1
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5, 6, 7]
    _, cfg, params = load_params(workdir)
    import jax

    assert cfg.channels == 32 and all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(params))


def test_outputs_to_gcs_are_refused_in_one_line(tmp_path):
    from starflow_jax.cli.output_paths import check_outputs

    with pytest.raises(ValueError, match="outputs are written to local files"):
        check_outputs(["gs://b/out.png"], overwrite=False)


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
