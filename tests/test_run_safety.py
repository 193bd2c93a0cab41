"""Nothing a user saved is lost (issue #21): damaged checkpoints are caught and the run
resumes from the previous good one exactly; a diverging run stops before it saves NaN;
an error or Ctrl-C mid-run finishes the checkpoint being written; configs are checked
before the workdir is touched; a workdir is locked; SIGTERM stops a run (and a process
whose peer is gone) promptly."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from fast_run import FAST, ROOT, TINY, quiet

from starflow_jax.cli.main import main
from starflow_jax.config import ConfigError, load_config
from starflow_jax.train import loop
from starflow_jax.train.loop import TrainingStopped, train
from starflow_jax.workdir.integrity import CheckpointUnreadable
from starflow_jax.workdir.layout import SET_ASIDE
from starflow_jax.workdir.params import load_params
from starflow_jax.workdir.run import WorkdirError, WorkdirLock


def _rows(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _array_files(workdir, step):
    return [f for f in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("d/*") if f.is_file()]


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run (checkpoints at steps 3 and 6) and its per-step losses."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(TINY, FAST), str(workdir), log=quiet)
    return workdir, [r["loss"] for r in _rows(workdir)]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    for lock in dst.glob(".lock.*"):
        lock.unlink()
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip_bytes, _truncate], ids=["flipped-bytes", "truncated"])
def test_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous_one(finished, tmp_path, damage, capsys):
    full, losses = finished
    workdir = _copy(full, tmp_path / "run")
    for f in _array_files(workdir, 6):
        damage(f)
    # commands that only read the workdir fall back too, saying so; an explicit --step names the problem
    _, _, params = load_params(workdir)
    assert "checkpoint step 6" in capsys.readouterr().err
    with pytest.raises(
        CheckpointUnreadable, match="checkpoint step 6 in .* (differ from what was saved|cannot be read)"
    ):
        load_params(workdir, step=6)
    logs = []
    train(load_config(TINY, FAST), str(workdir), log=logs.append)
    assert any("set aside" in line and "step 6" in line for line in logs), logs
    assert any("resumed from" in line and "at step 3" in line for line in logs), logs
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the replayed steps' rows are not duplicated
    assert [r["loss"] for r in rows] == losses  # steps 4..6 again, bit for bit
    assert (workdir / SET_ASIDE / "6").is_dir()  # kept for the user, out of the run


def test_missing_metadata_is_named(finished, tmp_path):
    workdir = _copy(finished[0], tmp_path / "run")
    (workdir / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointUnreadable, match=r"state/_METADATA is missing"):
        load_params(workdir, step=6)


@pytest.mark.slow
def test_resume_an_earlier_step_and_extend_a_finished_run(finished, tmp_path):
    full, losses = finished
    workdir = _copy(full, tmp_path / "run")
    logs = []
    # more steps than the finished run: allowed (the model and data are the same); from step 3 on request
    train(load_config(TINY, FAST + ["train.steps=7"]), str(workdir), log=logs.append, step=3)
    assert any("the later checkpoint 6 is set aside" in line for line in logs), logs
    assert any("train.steps: 6 -> 7" in line for line in logs), logs
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert (workdir / "config_history.jsonl").exists() and json.loads((workdir / "config.json").read_text())["train"][
        "steps"
    ] == 7
    # another model is refused, naming the difference
    with pytest.raises(WorkdirError, match=r"model.channels: 32 there, 48 here"):
        train(load_config(TINY, FAST + ["model.channels=48"]), str(workdir), log=quiet)
    with pytest.raises(ValueError, match=r"--step 5: no checkpoint at that step"):
        train(load_config(TINY, FAST + ["train.steps=7"]), str(workdir), log=quiet, step=5)


@pytest.mark.slow
def test_a_diverging_run_stops_and_never_saves_nan(tmp_path):
    config = load_config(
        TINY,
        FAST
        + [
            "train.steps=30",
            "train.lr=1e6",
            "train.warmup_steps=0",
            "train.grad_clip=0.0",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=30",
            "train.max_consecutive_skips=3",
        ],
    )
    with pytest.raises(
        TrainingStopped,
        match=r"updates since step (\d+) were all skipped.*last good checkpoint is "
        r"step \d+",
    ):
        train(config, str(tmp_path), log=quiet)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 30
    for s in steps:  # every saved state reads back, finite
        _, _, params = load_params(tmp_path, step=s)
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))


def test_an_error_mid_run_finishes_the_checkpoint_being_written(tmp_path, monkeypatch, capsys):
    real = loop.MetricsWriter.write

    def write(self, step, row):
        if step == 4:  # right after step 3's checkpoint was started (asynchronously)
            raise OSError("disk full (injected)")
        real(self, step, row)

    monkeypatch.setattr(loop.MetricsWriter, "write", write)
    args = ["train", "--config", str(TINY), "--workdir", str(tmp_path)] + sum((["--set", o] for o in FAST), [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == "starflow-jax train: error: disk full (injected)"
    ckpt = tmp_path / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "3" in names and all(n.isdigit() for n in names), names  # no *.orbax-checkpoint-tmp left
    assert (ckpt / "3" / "commit_success.txt").exists()

    def interrupt(self, step, row):
        if step == 5:
            raise KeyboardInterrupt
        real(self, step, row)

    monkeypatch.setattr(loop.MetricsWriter, "write", interrupt)
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(loop.MetricsWriter, "write", real)
    assert main(args) == 0
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=-4", r"train.batch_size must be an integer >= 1, got -4"),
        ("train.batch_size=0", r"train.batch_size must be an integer >= 1, got 0"),
        ("train.log_every=0", r"train.log_every must be an integer >= 1"),
        ("train.keep_checkpoints=0", r"train.keep_checkpoints must be an integer >= 1"),
        ("train.grad_accum=3", r"does not split into train.grad_accum=3"),
        ("train.drop_label=1.5", r"train.drop_label must be a number in \[0.0, 1.0\]"),
        ("train.noise_type=gauss", r"train.noise_type must be 'gaussian' or 'uniform'"),
        ("mesh.data=3", r"mesh .* does not fit"),
        ("train.steps=abc", r"train.steps is of type int \(now 6\), got 'abc'"),
    ],
)
def test_bad_settings_are_refused_before_the_workdir_is_touched(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    args = ["train", "--config", str(TINY), "--workdir", str(workdir)] + sum((["--set", o] for o in FAST), [])
    assert main(args + ["--set", override]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    import re

    assert re.search(message, err), err
    assert not workdir.exists()  # nothing written: the corrected command starts cleanly


def test_numbers_are_numbers_and_text_is_text():
    config = load_config(
        TINY,
        [
            "train.lr=3e-4",
            "train.min_lr=1E-6",
            "train.steps=10",
            "train.seed=1_000",
            "data.vid_size=81:16",
            "train.remat=dots",
        ],
    )
    assert config.train.lr == 3e-4 and config.train.min_lr == 1e-6 and config.train.steps == 10
    assert config.train.seed == 1000 and config.data.vid_size == "81:16" and config.train.remat == "dots"
    with pytest.raises(ConfigError, match="no key"):
        load_config(TINY, ["train.lrr=3e-4"])


def test_a_workdir_is_locked(tmp_path):
    lock = WorkdirLock(tmp_path)
    try:
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {os.getpid()}"):
            train(load_config(TINY, FAST), str(tmp_path), log=quiet)
    finally:
        lock.release()
    assert not (tmp_path / "config.json").exists()


def test_training_an_imported_workdir_starts_from_its_weights(tmp_path, capsys):
    from flax import nnx

    from starflow_jax.config import model_config
    from starflow_jax.interop.state_dict import to_reference
    from starflow_jax.model import StarFlow

    config = load_config(TINY, FAST)
    model = StarFlow(model_config(config), rngs=nnx.Rngs(7))
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in to_reference(nnx.state(model, nnx.Param)).items()},
        str(tmp_path / "w.safetensors"),
    )
    workdir = tmp_path / "run"
    assert (
        main(
            ["import", "--torch", str(tmp_path / "w.safetensors"), "--config", str(TINY), "--out", str(workdir)]
            + sum((["--set", o] for o in FAST[:2]), [])
        )
        == 0
    )
    damaged = _copy(workdir, tmp_path / "damaged")  # imported parameters carry fingerprints too
    _flip_bytes(max((f for f in (damaged / "params").rglob("d/*") if f.is_file()), key=lambda f: f.stat().st_size))
    with pytest.raises(CheckpointUnreadable, match=r"imported parameters .* differ from what was saved"):
        load_params(damaged)
    logs = []
    train(
        load_config(TINY, FAST + ["train.steps=1", "train.lr=0.0", "train.min_lr=0.0", "train.checkpoint_every=1"]),
        str(workdir),
        log=logs.append,
    )
    assert any(f"initialised the parameters from {workdir}" in line for line in logs), logs
    capsys.readouterr()
    _, _, trained = load_params(workdir)  # the run's checkpoint (lr 0: the imported weights), said so
    assert "the imported parameters in params/ were where that training started" in capsys.readouterr().err
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ SIGTERM
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(workdir, extra, nproc=1, pid=0, port=0, grace="8"):
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        STARFLOW_SIGTERM_GRACE_S=grace,
    )
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "starflow_jax.cli.main", "train", "--config", str(TINY), "--workdir", str(workdir)]
    cmd += sum((["--set", o] for o in FAST + extra), [])
    if nproc > 1:
        cmd += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id", str(pid)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(proc, text, timeout=300):
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError("".join(lines[-30:]))


@pytest.mark.slow
def test_sigterm_saves_and_the_run_resumes(tmp_path):
    # a long grace: the timer must not cut the save short on a loaded CI machine
    proc = _spawn(tmp_path, ["train.steps=100000", "train.checkpoint_every=100000", "sample.every=0"], grace="120")
    _wait_for(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM after step" in out, out
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert 3 <= max(steps) < 100000  # saved where it stopped (the next interval is far away)
    assert max(r["step"] for r in _rows(tmp_path)) == max(steps)


@pytest.mark.slow
def test_the_survivor_of_a_killed_peer_exits_soon_after_sigterm(tmp_path):
    port = _free_port()
    procs = [_spawn(tmp_path, ["train.steps=100000", "train.checkpoint_every=100000"], 2, i, port) for i in range(2)]
    try:
        _wait_for(procs[0], "step 2/")
        procs[1].kill()  # one process dies (OOM, hardware): the other blocks in the next collective
        procs[1].wait()
        time.sleep(2)
        t0 = time.time()
        procs[0].send_signal(signal.SIGTERM)  # the launcher stops the survivor
        out, _ = procs[0].communicate(timeout=60)
        took = time.time() - t0
        print(f"survivor exited {took:.1f} s after SIGTERM, rc {procs[0].returncode}")
        assert took < 15, out[-3000:]
        # blocked in the collective: the grace timer's exit (143); or gloo noticed the lost peer
        # first (one error line) and the process, waiting in the runtime's shutdown, ends by the signal
        assert procs[0].returncode in (128 + signal.SIGTERM, -signal.SIGTERM), (procs[0].returncode, out[-3000:])
        assert "exiting now" in out or "error:" in out, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _two_processes(workdir, extra, grace="8"):
    port = _free_port()
    return [_spawn(workdir, extra, 2, i, port, grace) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_at_one_step_and_resumes_exactly(tmp_path):
    """As a TPU VM before maintenance: one process gets SIGTERM; both agree on a step, save
    there together and exit 143; the resumed run's losses equal an uninterrupted run's."""
    extra = ["train.steps=60", "train.checkpoint_every=1000", "train.warmup_steps=2", "train.log_every=5"]
    full = _two_processes(tmp_path / "full", extra)
    for p in full:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    # a grace period long enough for the agreed save on a loaded CI machine (the grace timer's own
    # exit is tested by test_the_survivor_of_a_killed_peer_exits_soon_after_sigterm)
    procs = _two_processes(tmp_path / "part", extra, grace="120")
    try:
        _wait_for(procs[0], "step 5/")
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs[0][-2000:] + outs[1][-2000:]
    steps = sorted(int(p.name) for p in (tmp_path / "part" / "checkpoints").iterdir() if p.name.isdigit())
    stop = max(steps)
    assert 5 <= stop < 60, (steps, outs[0][-2000:], outs[1][-2000:])
    assert f"stopped by SIGTERM after step {stop}" in outs[0], outs[0][-2000:]
    resumed = _two_processes(tmp_path / "part", extra)
    for p in resumed:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        if "resumed from" in out:
            assert f"at step {stop}" in out
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(5, 61, 5))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_profile_writes_a_trace_of_the_asked_steps(tmp_path):
    logs = []
    train(load_config(TINY, FAST + ["train.steps=3", "train.profile=[2, 1]"]), str(tmp_path), log=logs.append)
    assert any("profile of steps 2-2" in line for line in logs), logs
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
