"""``starflow-jax export`` and ``starflow-jax import``: checkpoints to and from the reference."""

from __future__ import annotations

import pathlib

from starflow_jax.cli.output_paths import check_outputs
from starflow_jax.config import load_config


def add_parsers(sub):
    e = sub.add_parser("export", help="a workdir's checkpoint to a reference .pth or safetensors file")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--ema", action="store_true", help="export the EMA parameters")
    e.add_argument("--format", choices=("torch", "safetensors"), required=True)
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=run_export)
    i = sub.add_parser("import", help="a reference .pth / .safetensors into a workdir (config.json + params/)")
    i.add_argument("--torch", dest="source", required=True, help="PATH.pth or PATH.safetensors")
    i.add_argument("--config", required=True, help="config file describing the architecture")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--out", required=True, help="workdir to create")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=run_import)


def run_export(args) -> int:
    from starflow_jax.interop import formats
    from starflow_jax.workdir import params as workdir_params

    # every file it writes (a safetensors file has its .yaml beside it), before any work
    out = check_outputs(formats.export_outputs(args.out, args.format), args.overwrite)[0]
    _, cfg, params = workdir_params.load_params(args.workdir, args.step, args.ema)
    arrays = formats.export_arrays(cfg, params, args.dtype, release=True)
    n = len(arrays)
    if args.format == "torch":
        formats.write_torch(out, arrays, args.dtype, overwrite=args.overwrite)
    else:
        formats.write_safetensors(out, arrays, cfg, args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: {n} tensors ({args.format}, {args.dtype})")
    return 0


def run_import(args) -> int:
    from starflow_jax.interop import formats

    if not pathlib.Path(args.source).exists():
        raise FileNotFoundError(f"--torch {args.source} does not exist")
    config = load_config(args.config, args.overrides)
    ignored = formats.import_reference(args.source, config, args.out, overwrite=args.overwrite)
    print(f"imported {args.source} into {args.out}" + (f" (ignored deprecated buffers: {ignored})" if ignored else ""))
    return 0
