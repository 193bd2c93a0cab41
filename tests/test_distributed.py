"""How a process decides to join a multi-process run (arguments, STARFLOW_* and SLURM
variables, TPU discovery) and the errors for inconsistent settings. No second process is
started here (tests/test_multihost.py runs real ones)."""

import pathlib

import jax
import pytest

from starflow_jax.parallel import distributed as D
from starflow_jax.parallel.distributed import Plan, first_slurm_host, resolve


def R(*args, env=None, tpu=False, **kw):
    return resolve(*args, env={} if env is None else env, tpu=tpu, **kw)


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith(("STARFLOW_", "SLURM_", "TPU_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    return monkeypatch


def test_nothing_given_is_one_process():
    assert R() == Plan("single", num_processes=1, process_id=0)
    assert R(num_processes=1) == Plan("single", num_processes=1, process_id=0)
    assert R(env={"STARFLOW_NUM_PROCESSES": "1", "STARFLOW_PROCESS_ID": "0"}).mode == "single"


def test_arguments():
    p = R("10.0.0.1:1234", 4, 3)
    assert p == Plan("explicit", "10.0.0.1:1234", 4, 3, None)
    assert R("[::1]:80", 2, 0, local_device_ids="0,1").local_device_ids == (0, 1)
    assert R("host:80", 2, 1, local_device_ids=3).local_device_ids == (3,)


def test_environment_and_arguments_override_it():
    env = {
        "STARFLOW_COORDINATOR": "node7:5000",
        "STARFLOW_NUM_PROCESSES": "8",
        "STARFLOW_PROCESS_ID": "5",
        "STARFLOW_LOCAL_DEVICE_IDS": "2",
    }
    assert R(env=env) == Plan("explicit", "node7:5000", 8, 5, (2,))
    # per-field: the flag wins, the rest comes from the environment
    assert R(process_id=6, env=env) == Plan("explicit", "node7:5000", 8, 6, (2,))
    assert R("other:1", 2, 0, env=env) == Plan("explicit", "other:1", 2, 0, (2,))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(coordinator_address="h:1", num_processes=2), "process id .* is not"),
        (dict(coordinator_address="h:1", process_id=1), "number of processes .* is not"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "out of range for 2 processes"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "must be >= 0"),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "must be >= 1"),
        (dict(num_processes=2, process_id=0), "need a coordinator address"),
        (dict(coordinator_address="h:1"), "without the number of processes"),
        (dict(coordinator_address="h", num_processes=2, process_id=0), "must be host:port"),
        (dict(coordinator_address=":1234", num_processes=2, process_id=0), "must be host:port"),
        (dict(coordinator_address="h:port", num_processes=2, process_id=0), "port must be a number"),
        (dict(coordinator_address="h:0", num_processes=2, process_id=0), "port must be a number"),
        (dict(coordinator_address="h:65536", num_processes=2, process_id=0), "port must be a number"),
        (dict(coordinator_address="grpc://h:1", num_processes=2, process_id=0), "must be host:port"),
        (dict(coordinator_address="::1:80", num_processes=2, process_id=0), "must be host:port"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids="0,x"), "local device ids"),
    ],
)
def test_invalid_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        R(**kw)


def test_invalid_environment_names_the_variable():
    with pytest.raises(ValueError, match="STARFLOW_NUM_PROCESSES.*integer, got 'two'"):
        R(env={"STARFLOW_NUM_PROCESSES": "two", "STARFLOW_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="STARFLOW_COORDINATOR"):
        R(env={"STARFLOW_COORDINATOR": "nohost", "STARFLOW_NUM_PROCESSES": "2", "STARFLOW_PROCESS_ID": "0"})


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node001", "node001"),
        ("node001,node002", "node001"),
        ("node[003-006]", "node003"),
        ("node[007,009-012],gpu1", "node007"),
        ("gpu-a100-[01-04]", "gpu-a100-01"),
        ("rack[2-3]-n[05-08]", "rack2-n05"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NODELIST": "node[003-006]", "SLURM_JOB_ID": "12345"}
    assert R(env=env) == Plan("slurm", "node003:22345", 4, 2, None)
    # srun's step variables win over the job's; STARFLOW_* over SLURM's
    env2 = dict(env, SLURM_STEP_NUM_TASKS="8", SLURM_STEP_NODELIST="gpu[10-13]", STARFLOW_COORDINATOR_PORT="7777")
    assert R(env=env2) == Plan("slurm", "gpu10:7777", 8, 2, None)
    assert R(env=dict(env, STARFLOW_COORDINATOR="head:9000")).coordinator_address == "head:9000"
    assert R(env=dict(env, STARFLOW_PROCESS_ID="0")).process_id == 0
    # a single task, an allocation without srun (no SLURM_PROCID), an explicit single process
    assert R(env=dict(env, SLURM_NTASKS="1", SLURM_PROCID="0")).mode == "single"
    assert R(env={k: v for k, v in env.items() if k != "SLURM_PROCID"}).mode == "single"
    assert R(env=dict(env, STARFLOW_NUM_PROCESSES="1")).mode == "single"
    with pytest.raises(ValueError, match="out of range"):
        R(env=dict(env, SLURM_PROCID="4"))
    with pytest.raises(ValueError, match="need a coordinator"):
        R(env={"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def test_tpu_discovery():
    assert R(tpu=True) == Plan("tpu")
    assert R(tpu=True, env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).mode == "tpu"
    assert R(tpu=True, env={"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"
    assert R(tpu=True, num_processes=1).mode == "single"
    assert R("w0:8476", 2, 1, tpu=True).mode == "explicit"  # explicit values win on TPU too
    assert D.on_cloud_tpu({"JAX_PLATFORMS": "cpu"}) is False
    assert D.on_cloud_tpu({"JAX_PLATFORMS": "tpu,cpu"}) is True


def test_initialize_single_process_touches_nothing(clean_env):
    from jax._src import xla_bridge

    before = xla_bridge.backends_are_initialized()
    info = D.initialize()
    assert info == D.DistributedInfo(0, 1, None, "single") and not info.is_multiprocess
    assert not jax.distributed.is_initialized()
    assert xla_bridge.backends_are_initialized() == before
    assert D.initialize() == info  # idempotent


def test_initialize_calls_jax_with_resolved_values(clean_env):
    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    clean_env.setattr(D, "_running", lambda source="existing": D.DistributedInfo(1, 2, "127.0.0.1:5555", source))
    clean_env.setenv("STARFLOW_PROCESS_ID", "1")
    info = D.initialize("127.0.0.1:5555", 2)
    assert info == D.DistributedInfo(1, 2, "127.0.0.1:5555", "explicit")
    assert calls == [
        dict(
            coordinator_address="127.0.0.1:5555",
            num_processes=2,
            process_id=1,
            local_device_ids=None,
            cluster_detection_method="deactivate",
            initialization_timeout=300,
        )
    ]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    with pytest.raises(ValueError, match="process id 2 is out of range"):
        D.initialize("127.0.0.1:5555", 2, 2)
    assert len(calls) == 1


def test_initialize_is_idempotent_once_running(clean_env):
    clean_env.setattr(jax.distributed, "is_initialized", lambda: True)
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("initialized twice"))
    clean_env.setattr(D, "_running", lambda source="existing": D.DistributedInfo(1, 2, "h:1", source))
    assert D.initialize() == D.DistributedInfo(1, 2, "h:1", "existing")
    assert D.initialize("h:1", 2, 1).process_index == 1
    with pytest.raises(ValueError, match="already running as process 1 of 2"):
        D.initialize("h:1", 4, 3)


def test_train_cli_reports_bad_settings(clean_env, tmp_path, capsys):
    from starflow_jax.cli.main import main

    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.py"
    rc = main(
        [
            "train",
            "--config",
            str(config),
            "--workdir",
            str(tmp_path / "w"),
            "--num-processes",
            "2",
            "--process-id",
            "0",
        ]
    )
    assert rc == 2 and "need a coordinator address" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_tpu_discovery_failure_falls_back_to_one_process(clean_env):
    def no_cluster(**kw):
        assert "coordinator_address" not in kw  # automatic discovery: no address given
        raise ValueError("coordinator_address should be defined.")

    clean_env.setenv("JAX_PLATFORMS", "tpu")
    clean_env.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.warns(UserWarning, match="could not discover the TPU workers"):
        assert D.initialize() == D.DistributedInfo(0, 1, None, "single")
