"""``starflow-jax plan``: the full training step lowered and compiled ahead of time for a
TPU slice (``jax.experimental.topologies``: no TPU and no parameters needed, only libtpu,
the ``tpu`` extra), with the TPU compiler's per-device memory, the step's FLOPs, the
compile time, and whether it fits the chip's HBM; several remat policies side by side.
Without libtpu it compiles for simulated CPU devices instead, and says so."""
from __future__ import annotations

import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from starflow_jax.bench.common import print_table, write_json
from starflow_jax.bench.flops import train_step_flops
from starflow_jax.config import load_config, model_config
from starflow_jax.layers.attention import resolve_attention
from starflow_jax.layers.splash import compile_target
from starflow_jax.layers.transformer import resolve_remat
from starflow_jax.model import StarFlow
from starflow_jax.parallel.mesh import AXES, check_batch_split, make_mesh
from starflow_jax.parallel.rules import batch_sharding, tree_shardings
from starflow_jax.train import optimizer
from starflow_jax.train import step as S

# HBM per chip (GiB) by the device kind the topology reports
HBM_GIB = {"TPU v5": 95.0, "TPU v5p": 95.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v4": 32.0, "TPU v6 lite": 32.0,
           "TPU v6e": 32.0}
GIB = 2.0 ** 30
COLUMNS = [("remat", "remat", "s"), ("argument_gib", "args_GiB", ".2f"), ("output_gib", "out_GiB", ".2f"),
           ("temp_gib", "temp_GiB", ".2f"), ("host_temp_gib", "host_GiB", ".2f"), ("code_gib", "code_GiB", ".3f"),
           ("total_gib", "total_GiB", ".2f"),
           ("hbm_gib", "HBM_GiB", ".0f"), ("fits", "fits", "s"), ("compile_seconds", "compile_s", ".1f"),
           ("tflops_per_step", "TFLOP/step", ".1f")]


def add_parser(sub):
    p = sub.add_parser("plan", help="compile the training step ahead of time for a TPU slice: memory per device")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4 (64 chips), v5e:16x16, v4:2x2x1")
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1", help="axis sizes, e.g. data=2,fsdp=32,tensor=1")
    p.add_argument("--batch", type=int, required=True, help="global batch")
    p.add_argument("--remat", default="full", help="policies to compare, comma separated (none, full, dots, dots_all, proj, offload)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the config's; bfloat16 for TPU runs)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the parameters (one more copy)")
    p.add_argument("--frames", type=int, default=None, help="latent frames per clip (video models; required there)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (train.grad_accum)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)
    return p


def parse_mesh(text: str) -> dict:
    sizes = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--mesh must look like data=2,fsdp=32,tensor=1, got {text!r}")
        k, v = part.split("=", 1)
        if k.strip() not in AXES:
            raise ValueError(f"unknown mesh axis {k.strip()!r}; the axes are {AXES}")
        sizes[k.strip()] = int(v)
    return sizes


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
            raise ValueError(f"libtpu is not installed (pip install -e '.[tpu]') and there are {len(devices)} CPU "
                             f"devices for a {chips}-chip topology: set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={chips} to simulate it") from e
        return devices[:chips], "cpu (simulated)", True


def plan_rows(config, topology: str, mesh_sizes: dict, batch: int, remats: list[str], dtype: str | None = None,
              ema: bool = False, frames: int | None = None, grad_accum: int = 1, log=print) -> tuple[list[dict], dict]:
    cfg = model_config(config)
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    devices, kind, simulated = topology_devices(topology)
    mesh = make_mesh(mesh_sizes, devices)
    check_batch_split(batch, grad_accum, mesh, "--batch", "--grad-accum")
    model = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(model)
    tx = optimizer.adamw(optax.constant_schedule(1e-4), grad_clip=1.0)
    if cfg.learnable_self_denoiser:
        tx = optimizer.flow_and_denoiser(tx, optax.constant_schedule(1e-4), grad_clip=1.0)
    abstract = jax.eval_shape(lambda: S.init_state(nnx.merge(graphdef, nnx.state(model)), tx, 0, ema))
    shard = tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    if cfg.is_video and not frames:
        raise ValueError("a video model needs --frames (latent frames per clip)")
    x_shape = (batch,) + ((frames,) if cfg.is_video else ()) + (cfg.in_channels, cfg.img_size, cfg.img_size)
    data = dict(image=jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=batch_sharding(mesh, len(x_shape))))
    if cfg.txt_dim > 0:
        data["cond"] = jax.ShapeDtypeStruct((batch, cfg.txt_size, cfg.txt_dim), jnp.float32,
                                            sharding=batch_sharding(mesh, 3))
    flops = train_step_flops(cfg, x_shape)
    target = "cpu" if simulated else "tpu"
    with compile_target(target):
        kernel = resolve_attention(cfg.attention_impl)
    hbm = HBM_GIB.get(kind) if not simulated else None
    info = dict(topology=topology, device_kind=kind, simulated=simulated, devices=len(devices),
                mesh=dict(mesh.shape), batch=batch, grad_accum=grad_accum, input_shape=list(x_shape), dtype=cfg.dtype,
                ema=ema, attention_impl=cfg.attention_impl, attention_kernel=kernel,
                params=sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params)))
    log(f"{topology}: {len(devices)} x {kind}{' (SIMULATED: libtpu not installed)' if simulated else ''}; mesh "
        f"{dict(mesh.shape)}; global batch {batch} in {grad_accum} micro-batches; input {x_shape}; "
        f"{info['params']:,} parameters; compute {cfg.dtype}, attention {cfg.attention_impl} -> kernel {kernel}")
    rows = []
    for remat in remats:
        hp = S.StepConfig(noise_std=0.3, remat=resolve_remat(remat), denoiser=cfg.learnable_self_denoiser,
                          grad_accum=grad_accum)
        step = jax.jit(functools.partial(S.train_step, graphdef=graphdef, tx=tx, hp=hp),
                       in_shardings=(shard, {k: v.sharding for k, v in data.items()}), out_shardings=(shard, None),
                       donate_argnums=0)
        t = time.perf_counter()
        try:
            # activations keep their batch sharding (parallel.rules.constrain_batch); attention
            # kernels chosen and compiled for the target (splash on TPU), not this host
            with jax.set_mesh(mesh), compile_target(target):
                compiled = step.lower(state, data).compile()
        except Exception as e:  # the TPU compiler refuses a program that does not fit its HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            need = re.search(r"required for [^(]*\(([\d.]+)G\)", str(e))
            rows.append(dict(remat=remat, total_gib=float(need.group(1)) if need else None, hbm_gib=hbm, fits="False",
                             compile_seconds=time.perf_counter() - t, tflops_per_step=flops / 1e12,
                             error=str(e).splitlines()[0][:300], **info))
            log(f"remat {remat}: does not fit: {str(e).splitlines()[0][:200]}")
            continue
        seconds = time.perf_counter() - t
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        total += m.generated_code_size_in_bytes
        rows.append(dict(remat=remat, argument_gib=m.argument_size_in_bytes / GIB,
                         output_gib=m.output_size_in_bytes / GIB, alias_gib=m.alias_size_in_bytes / GIB,
                         temp_gib=m.temp_size_in_bytes / GIB, code_gib=m.generated_code_size_in_bytes / GIB,
                         total_gib=total / GIB, hbm_gib=hbm, fits=None if hbm is None else str(total / GIB <= hbm),
                         host_temp_gib=getattr(m, "host_temp_size_in_bytes", 0) / GIB,
                         compile_seconds=seconds, tflops_per_step=flops / 1e12,
                         flops_per_device=flops / len(devices), **info))
    return rows, info


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    remats = [r.strip() for r in args.remat.split(",") if r.strip()]
    rows, _ = plan_rows(config, args.topology, parse_mesh(args.mesh), args.batch, remats, args.dtype, args.ema,
                        args.frames, args.grad_accum)
    print_table(rows, COLUMNS)
    print("per device: arguments (parameters, optimizer state, batch shard), outputs (the new state, aliased "
          "to the donated arguments), temporaries (activations, gradients), generated code; total = args + out "
          "+ temp + code - aliased")
    write_json(args.json, rows)
    return 0
