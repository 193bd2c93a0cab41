"""Joining a multi-process JAX run (``jax.distributed``) before anything touches the devices.

``initialize()`` decides from its arguments and the environment whether this process is
one of several, and if so calls ``jax.distributed.initialize`` once:

1. explicit values: each of ``coordinator_address``, ``num_processes``, ``process_id``,
   ``local_device_ids`` is taken from the argument when given, else from
   ``STARFLOW_COORDINATOR`` (``host:port``), ``STARFLOW_NUM_PROCESSES``,
   ``STARFLOW_PROCESS_ID``, ``STARFLOW_LOCAL_DEVICE_IDS`` (comma-separated);
2. SLURM (a task started by ``srun``, i.e. ``SLURM_PROCID`` is set): the process count and
   id come from ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) and ``SLURM_PROCID`` where
   step 1 left them unset; the coordinator, when not given, is the first host of
   ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` on port ``STARFLOW_COORDINATOR_PORT``
   (default ``20000 + SLURM_JOB_ID % 10000``);
3. a Cloud TPU VM with nothing of the above: ``jax.distributed.initialize()`` without
   arguments (JAX discovers the pod slice's workers itself), unless
   ``TPU_WORKER_HOSTNAMES`` names a single host; when JAX finds no description of the
   slice, a warning and a single process;
4. otherwise a single process: nothing is done.

``STARFLOW_NUM_PROCESSES=1`` (or ``num_processes=1``) forces a single process. Calling it
again is harmless: a running ``jax.distributed`` is reported, not restarted. Where several
processes run and the platform may be the CPU, CPU collectives go over gloo.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping, Sequence

ENV_COORDINATOR = "STARFLOW_COORDINATOR"
ENV_NUM_PROCESSES = "STARFLOW_NUM_PROCESSES"
ENV_PROCESS_ID = "STARFLOW_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "STARFLOW_LOCAL_DEVICE_IDS"
ENV_COORDINATOR_PORT = "STARFLOW_COORDINATOR_PORT"

_NAMES = dict(
    coordinator_address=f"coordinator address (--coordinator-address / {ENV_COORDINATOR})",
    num_processes=f"number of processes (--num-processes / {ENV_NUM_PROCESSES})",
    process_id=f"process id (--process-id / {ENV_PROCESS_ID})",
    local_device_ids=f"local device ids ({ENV_LOCAL_DEVICE_IDS})",
)


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: its index among ``process_count`` processes."""

    process_index: int
    process_count: int
    coordinator_address: str | None = None
    source: str = "single"  # single | explicit | slurm | tpu | existing

    @property
    def is_multiprocess(self) -> bool:
        return self.process_count > 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``initialize`` will do (``resolve``'s answer; no side effects)."""

    mode: str  # "single", "explicit", "slurm" or "tpu" (automatic discovery)
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


# --------------------------------------------------------------------------- parsing


def _int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{_NAMES.get(what, what)} must be an integer, got {value!r}")
    try:
        out = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"{_NAMES.get(what, what)} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{_NAMES.get(what, what)} must be >= {minimum}, got {out}")
    return out


def check_address(address: str) -> str:
    """``host:port`` (``[v6addr]:port`` for IPv6), port in 1..65535; returns it stripped."""
    address = str(address).strip()
    bad = f"{_NAMES['coordinator_address']} must be host:port (e.g. 10.0.0.1:1234), got {address!r}"
    if "://" in address or ":" not in address:
        raise ValueError(bad)
    host, port = address.rsplit(":", 1)
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(bad)
    elif not host or ":" in host or any(c.isspace() or c == "/" for c in host):
        raise ValueError(bad)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{bad}: the port must be a number in 1..65535")
    return address


def _device_ids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        if not parts:
            return None
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    return tuple(_int(p, "local_device_ids", 0) for p in parts)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[001-004,007],gpu1`` -> ``node001``,
    ``rack[1-2]-n[01-08]`` -> ``rack1-n01``."""
    out, i = [], 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            j = nodelist.find("]", i)
            if j < 0:
                raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
            out.append(nodelist[i + 1 : j].split(",")[0].split("-")[0])
            i = j + 1
        else:
            out.append(nodelist[i])
            i += 1
    host = "".join(out).strip()
    if not host:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    return host


def _slurm(env: Mapping[str, str]) -> dict | None:
    """Count, id and a default coordinator of an ``srun`` task; None outside one."""
    count = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_PROCID" not in env or not count:
        return None
    out = dict(num_processes=_int(count, "SLURM_NTASKS", 1), process_id=_int(env["SLURM_PROCID"], "SLURM_PROCID", 0))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        job = _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID", 0)
        port = env.get(ENV_COORDINATOR_PORT) or str(20000 + job % 10000)
        out["coordinator_address"] = f"{first_slurm_host(nodelist)}:{port}"
    return out


def on_cloud_tpu(env: Mapping[str, str] | None = None) -> bool:
    """A Cloud TPU VM, decided without starting a JAX backend."""
    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return "tpu" in platforms.split(",")
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private API: fall back to the device files
        return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


# --------------------------------------------------------------------------- resolution


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    *,
    env: Mapping[str, str] | None = None,
    tpu: bool | None = None,
) -> Plan:
    """Decide, without side effects, how this process joins the run (see the module doc).
    ``env`` defaults to ``os.environ``; ``tpu`` (default: ``on_cloud_tpu(env)``) says
    whether automatic TPU discovery applies."""
    env = os.environ if env is None else env

    def pick(value, var):  # the argument, else the environment variable (empty = unset)
        return value if value is not None else env.get(var) or None

    given = dict(
        coordinator_address=pick(coordinator_address, ENV_COORDINATOR),
        num_processes=pick(num_processes, ENV_NUM_PROCESSES),
        process_id=pick(process_id, ENV_PROCESS_ID),
    )
    ids = _device_ids(local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS))
    addr = check_address(given["coordinator_address"]) if given["coordinator_address"] is not None else None
    count = _int(given["num_processes"], "num_processes", 1) if given["num_processes"] is not None else None
    pid = _int(given["process_id"], "process_id", 0) if given["process_id"] is not None else None
    mode = "explicit"

    if None in (addr, count, pid) and count != 1:
        slurm = _slurm(env)
        if slurm is not None:  # an srun task: fill in what was not given
            count = slurm["num_processes"] if count is None else count
            pid = slurm["process_id"] if pid is None else pid
            addr = addr or slurm.get("coordinator_address")
            mode = "slurm"
    if count == 1 and pid is None:
        pid = 0
    if (count is None) != (pid is None):
        have, missing = ("num_processes", "process_id") if pid is None else ("process_id", "num_processes")
        raise ValueError(
            f"the {_NAMES[have]} is given but the {_NAMES[missing]} is not: give both "
            "(or neither, for a single process or automatic discovery on TPU)"
        )
    if count is not None and not pid < count:
        raise ValueError(
            f"process id {pid} is out of range for {count} processes: it must be one of "
            f"0..{count - 1} (--process-id / {ENV_PROCESS_ID} / SLURM_PROCID)"
        )

    if count is None:  # nothing given: TPU pod slices discover themselves
        if addr is not None:
            raise ValueError(
                f"the {_NAMES['coordinator_address']} is given without the {_NAMES['num_processes']} "
                f"and the {_NAMES['process_id']}"
            )
        if tpu is None:
            tpu = on_cloud_tpu(env)
        hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
        if tpu and not (hosts and len([h for h in hosts.split(",") if h.strip()]) == 1):
            return Plan("tpu", local_device_ids=ids)
        return Plan("single", num_processes=1, process_id=0)
    if count == 1:
        return Plan("single", coordinator_address=addr, num_processes=1, process_id=0)
    if addr is None:
        raise ValueError(
            f"{count} processes need a {_NAMES['coordinator_address']}: the host:port of process 0, "
            "the same for every process"
        )
    return Plan(mode, addr, count, pid, ids)


# --------------------------------------------------------------------------- initialisation


def _cpu_collectives(env: Mapping[str, str]) -> None:
    """Cross-process collectives on CPU devices go over gloo (as tests/multihost_worker.py)."""
    import jax

    platforms = env.get("JAX_PLATFORMS", "").lower()
    if not platforms or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _running(source: str = "existing") -> DistributedInfo:
    import jax
    from jax._src import distributed as _dist

    return DistributedInfo(
        jax.process_index(), jax.process_count(), getattr(_dist.global_state, "coordinator_address", None), source
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | str | None = None,
    *,
    initialization_timeout: int = 300,
    log=None,
) -> DistributedInfo:
    """Join the multi-process run this process belongs to (see the module doc); a single
    process returns ``DistributedInfo(0, 1)`` without touching JAX. Call it before any JAX
    computation or ``jax.devices()``. Raises ``ValueError`` for inconsistent settings."""
    import jax

    if jax.distributed.is_initialized():
        info = _running()
        plan = resolve(coordinator_address, num_processes, process_id, local_device_ids)
        asked = (plan.num_processes, plan.process_id)
        if plan.mode in ("explicit", "slurm") and asked != (info.process_count, info.process_index):
            raise ValueError(
                f"jax.distributed is already running as process {info.process_index} of "
                f"{info.process_count}, not {plan.process_id} of {plan.num_processes}"
            )
        return info
    plan = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if plan.mode == "single":
        return DistributedInfo(0, 1, None, "single")
    if plan.mode == "tpu":
        if log:
            log("jax.distributed: discovering the TPU pod slice's processes")
        try:
            jax.distributed.initialize(
                local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
                initialization_timeout=initialization_timeout,
            )
        except ValueError as e:  # JAX found no TPU cluster description (no metadata server, ...)
            if jax.distributed.is_initialized():
                raise
            import warnings

            warnings.warn(
                f"jax.distributed could not discover the TPU workers ({e}); running as one process. "
                f"On a multi-host slice give --coordinator-address, --num-processes and --process-id "
                f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).",
                stacklevel=2,
            )
            return DistributedInfo(0, 1, None, "single")
        return _running("tpu")
    _cpu_collectives(os.environ)
    if log:
        log(
            f"jax.distributed: process {plan.process_id} of {plan.num_processes}, coordinator "
            f"{plan.coordinator_address} ({plan.mode})"
        )
    # Everything is resolved: no cluster auto-detection (under SLURM it would restrict each
    # process to the GPU numbered SLURM_LOCALID even with one process per node).
    jax.distributed.initialize(
        coordinator_address=plan.coordinator_address,
        num_processes=plan.num_processes,
        process_id=plan.process_id,
        local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
        cluster_detection_method="deactivate",
        initialization_timeout=initialization_timeout,
    )
    return _running(plan.mode)
