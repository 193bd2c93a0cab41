"""``starflow-jax plan``: the training step of a config, built by the same function as
``train`` builds it (``train.program``: its mesh, batch, remat, dtype, accumulation, from
the config and ``--set``), lowered and compiled ahead of time for a TPU slice
(``jax.experimental.topologies``: no TPU and no parameters needed, only libtpu, the ``tpu``
extra). Prints the TPU compiler's per-device memory and whether it fits the chip's HBM, the
compiled program's FLOPs, HBM traffic and collective bytes per step (``bench.hlo_stats``),
and a roofline bound of the step time and MFU from the chip's published peaks; several
remat policies side by side. Without libtpu it compiles for simulated CPU devices
instead, and says so."""

from __future__ import annotations

import math
import re
import time

import jax

from starflow_jax.bench.common import print_table, write_json
from starflow_jax.bench.flops import train_step_flops
from starflow_jax.bench.hlo_stats import CHIPS, chip_of, hlo_stats, roofline
from starflow_jax.config import check_training_config, load_config
from starflow_jax.layers.attention import resolve_attention
from starflow_jax.layers.platform import compile_target
from starflow_jax.train.program import batch_layout, build_program, training_mesh

# HBM per chip (GiB) by the device kind the topology reports
HBM_GIB = {
    "TPU v5": 95.0,
    "TPU v5p": 95.0,
    "TPU v5 lite": 16.0,
    "TPU v5e": 16.0,
    "TPU v4": 32.0,
    "TPU v6 lite": 32.0,
    "TPU v6e": 32.0,
}
GIB = 2.0**30
COLUMNS = [
    ("remat", "remat", "s"),
    ("argument_gib", "args_GiB", ".2f"),
    ("output_gib", "out_GiB", ".2f"),
    ("temp_gib", "temp_GiB", ".2f"),
    ("host_temp_gib", "host_GiB", ".2f"),
    ("code_gib", "code_GiB", ".3f"),
    ("total_gib", "total_GiB", ".2f"),
    ("hbm_gib", "HBM_GiB", ".0f"),
    ("fits", "fits", "s"),
    ("compile_seconds", "compile_s", ".1f"),
    ("model_tflops", "model_TFLOP", ".4g"),
    ("hlo_tflops_per_device", "HLO_TFLOP/dev", ".4g"),
    ("hbm_gb_per_device", "HBM_GB/dev", ".4g"),
    ("collective_gb_per_device", "coll_GB/dev", ".4g"),
    ("step_s_bound", "step_s>=", ".3g"),
    ("bound_by", "bound_by", "s"),
    ("mfu_bound", "MFU<=", ".1%"),
]


def add_parser(sub):
    p = sub.add_parser(
        "plan",
        help="compile the config's training step ahead of time for a TPU slice: memory, FLOPs, collectives, roofline",
    )
    p.add_argument("--config", required=True)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="as for train: mesh.*, train.batch_size, train.remat, train.grad_accum, model.dtype, ...",
    )
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4 (64 chips), v5e:16x16, v4:2x2x1")
    p.add_argument(
        "--remat",
        default=None,
        help="compare these remat policies, comma separated (none, full, dots, "
        "dots_all, proj, offload; default: the config's train.remat)",
    )
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)
    return p


def topology_devices(name: str):
    """``(devices, kind, simulated)``: the TPU topology's devices from libtpu, or, without
    it, this host's CPU devices (which must then be as many as the topology's chips)."""
    import importlib.util
    import os

    from jax.experimental import topologies

    # compiling only: several plan commands (or a TPU job) may hold libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
        return list(topo.devices), topo.devices[0].device_kind, False
    except Exception as e:  # no libtpu, or an unknown topology
        if importlib.util.find_spec("libtpu") is not None:
            raise ValueError(f"cannot describe TPU topology {name!r}: {e}") from e
        try:
            chips = math.prod(int(v) for v in name.split(":")[-1].split("x"))
        except ValueError:
            raise ValueError(f"topology must look like v5p:4x4x4, got {name!r}") from None
        devices = jax.devices("cpu")
        if len(devices) < chips:
            raise ValueError(
                f"libtpu is not installed (pip install -e '.[tpu]') and there are {len(devices)} CPU "
                f"devices for a {chips}-chip topology: set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={chips} to simulate it"
            ) from e
        return devices[:chips], "cpu (simulated)", True


def plan_program(config, devices):
    """The training program ``train`` would run for ``config`` on ``devices`` (its mesh, batch,
    remat, dtype, accumulation), with the global batch it would feed it, as
    ``jax.ShapeDtypeStruct``s: ``(program, batch)``."""
    t = config.train
    check_training_config(config)
    mesh = training_mesh(config, devices)
    num_classes, layout = batch_layout(config)
    program = build_program(config, mesh, num_classes)
    batch = {k: jax.ShapeDtypeStruct((int(t.batch_size),) + shape, dtype) for k, (shape, dtype) in layout.items()}
    shard = program.batch_shardings(batch)
    return program, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k]) for k, v in batch.items()}


def plan_rows(config, topology: str, remats: list[str] | None = None, log=print) -> tuple[list[dict], dict]:
    devices, kind, simulated = topology_devices(topology)
    chip = chip_of(topology)
    remats = remats or [str(config.train.remat)]
    target = "cpu" if simulated else "tpu"
    rows, info = [], None
    for remat in remats:
        config = config.copy_and_resolve_references()
        config.train.remat = remat
        program, batch = plan_program(config, devices)
        cfg, mesh = program.cfg, program.mesh
        x_shape = tuple(batch["image"].shape)
        model_flops = train_step_flops(cfg, x_shape)
        if info is None:
            with compile_target(target):
                kernel = resolve_attention(cfg.attention_impl)
            info = dict(
                topology=topology,
                device_kind=kind,
                chip=chip,
                simulated=simulated,
                devices=len(devices),
                mesh=dict(mesh.shape),
                batch=x_shape[0],
                grad_accum=program.hp.grad_accum,
                input_shape=list(x_shape),
                dtype=cfg.dtype,
                ema=program.hp.ema_decay > 0,
                attention_impl=cfg.attention_impl,
                attention_kernel=kernel,
                params=sum(math.prod(a.shape) for a in jax.tree.leaves(program.abstract_state.params)),
            )
            log(
                f"{topology}: {len(devices)} x {kind}{' (SIMULATED: libtpu not installed)' if simulated else ''}; "
                f"mesh {dict(mesh.shape)}; global batch {x_shape[0]} in {program.hp.grad_accum} micro-batches; "
                f"input {x_shape}; {info['params']:,} parameters; compute {cfg.dtype}, attention "
                f"{cfg.attention_impl} -> kernel {kernel}"
            )
        hbm = HBM_GIB.get(kind) if not simulated else None
        t = time.perf_counter()
        try:
            # activations keep their batch sharding (parallel.rules.constrain_batch); attention
            # kernels chosen and compiled for the target (splash on TPU), not this host
            with jax.set_mesh(mesh), compile_target(target):
                compiled = program.lower(program.abstract_state, batch).compile()
        except Exception as e:  # the TPU compiler refuses a program that does not fit its HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            need = re.search(r"required for [^(]*\(([\d.]+)G\)", str(e))
            rows.append(
                dict(
                    remat=remat,
                    total_gib=float(need.group(1)) if need else None,
                    hbm_gib=hbm,
                    fits="False",
                    compile_seconds=time.perf_counter() - t,
                    model_tflops=model_flops / 1e12,
                    error=str(e).splitlines()[0][:300],
                    **info,
                )
            )
            log(f"remat {remat}: does not fit: {str(e).splitlines()[0][:200]}")
            continue
        seconds = time.perf_counter() - t
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        total += m.generated_code_size_in_bytes
        stats = hlo_stats(compiled.as_text())
        row = dict(
            remat=remat,
            argument_gib=m.argument_size_in_bytes / GIB,
            output_gib=m.output_size_in_bytes / GIB,
            alias_gib=m.alias_size_in_bytes / GIB,
            temp_gib=m.temp_size_in_bytes / GIB,
            code_gib=m.generated_code_size_in_bytes / GIB,
            total_gib=total / GIB,
            hbm_gib=hbm,
            fits=None if hbm is None else str(total / GIB <= hbm),
            host_temp_gib=getattr(m, "host_temp_size_in_bytes", 0) / GIB,
            compile_seconds=seconds,
            model_tflops=model_flops / 1e12,
            hlo_tflops_per_device=stats.flops / 1e12,
            hbm_gb_per_device=stats.bytes_accessed / 1e9,
            collective_gb_per_device=stats.total_collective_bytes / 1e9,
            collective_gb=dict((k, v / 1e9) for k, v in stats.collective_bytes.items()),
            unknown_trip_counts=stats.unknown_trip_counts,
            kernels=stats.kernels,
            **info,
        )
        if chip is not None:
            bound = roofline(stats, model_flops / len(devices), chip)
            row.update(
                step_s_bound=bound["bound_s"], bound_by=bound["bound_by"], mfu_bound=bound["mfu_bound"], roofline=bound
            )
        rows.append(row)
    return rows, info


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    remats = [r.strip() for r in args.remat.split(",") if r.strip()] if args.remat else None
    rows, info = plan_rows(config, args.topology, remats)
    print_table(rows, COLUMNS)
    print(
        "per device: arguments (parameters, optimizer state, batch shard), outputs (the new state, aliased "
        "to the donated arguments), temporaries (activations, gradients), generated code; total = args + out "
        "+ temp + code - aliased. model_TFLOP: the step's model FLOPs (all devices, analytic); HLO_TFLOP/dev: "
        "the compiled program's dot FLOPs per device (remat recomputation included); HBM_GB/dev: its "
        "instructions' reads and writes; coll_GB/dev: its collectives' results; loops counted per iteration"
    )
    if info and info["chip"]:
        c = CHIPS[info["chip"]]
        print(
            f"roofline BOUND, not a measurement: step_s >= max(HLO FLOPs / {c['flops'] / 1e12:.0f} TFLOP/s, HBM "
            f"bytes / {c['hbm_bw'] / 1e9:.0f} GB/s, collective bytes / {c['ici_bw'] / 1e9:.0f} GB/s ICI), the "
            f"published peaks of one {info['chip']} chip; MFU_bound = model FLOPs per device / (step_s x peak)"
        )
    write_json(args.json, rows)
    return 0
