"""The multi-process options commands share (``jax.distributed``): one argument group, the
join before any device is touched, and a barrier."""

from __future__ import annotations


def add_arguments(p) -> None:
    d = p.add_argument_group(
        "multi-process runs (jax.distributed)",
        "One process per host (or per GPU), every process running the same command with its own --process-id. "
        "Defaults: STARFLOW_COORDINATOR, STARFLOW_NUM_PROCESSES, STARFLOW_PROCESS_ID, then SLURM's srun "
        "variables; on a Cloud TPU pod slice JAX discovers the processes itself. Without any of these: one process.",
    )
    d.add_argument(
        "--coordinator-address",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordinator service, the same for every process",
    )
    d.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes in the run")
    d.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0..N-1")


def initialize(args, log=print):
    """Join the run the arguments (or the environment) describe; call before anything touches
    the JAX devices. Returns ``distributed.initialize``'s info."""
    from starflow_jax.parallel import distributed

    info = distributed.initialize(
        getattr(args, "coordinator_address", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
        log=log,
    )
    if info.is_multiprocess:
        log(f"process {info.process_index} of {info.process_count} ({info.source})")
    return info


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
