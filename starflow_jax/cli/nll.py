"""``starflow-jax nll``: negative log-likelihood and bits per dimension of data under a model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.cli import model_source
from starflow_jax.cli.output_paths import check_outputs
from starflow_jax.config import model_config
from starflow_jax.flow.loss import bits_per_dim, nll_per_example


def add_parser(sub):
    p = sub.add_parser("nll", help="NLL per dimension and bits per dimension of data under reference weights")
    model_source.add_arguments(p)
    p.add_argument(
        "--data",
        help=".npy of inputs (n, c, h, w) or (n, t, c, h, w); default for a digits "
        "workdir: its held-out split (uniform dequantisation)",
    )
    p.add_argument("--cond", help=".npy of conditioning (n, txt_size, txt_dim) for a conditioned model")
    p.add_argument("--labels", help=".npy of integer class labels, one-hot encoded to (n, 1, txt_dim)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--data-scale",
        type=float,
        default=1.0,
        help="scale of a discrete range in the data (127.5 for 8-bit pixels mapped to [-1, 1])",
    )
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.set_defaults(func=run)
    return p


def _load(path: str, flag: str) -> np.ndarray:
    """An array from a ``.npy`` file; a file that is none is an error naming it."""
    try:
        x = np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: not a readable .npy file: {e}") from e
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{flag} {path}: expected one array (.npy), got an archive of {len(x.files)}")
    return x


def check_data(x: np.ndarray, path: str, config, cfg) -> None:
    """``x`` must have the layout the model reads: ``(n, c, h, w)`` for an image model,
    ``(n, t, c, h, w)`` for a video model, with ``c, h, w`` its ``in_channels`` and
    ``img_size`` (else the NLL would be of another model's data), and ``n >= 1``."""
    video = model_source.is_video_model(config, cfg)
    c, s = cfg.in_channels, cfg.img_size
    want = f"(n, t, {c}, {s}, {s})" if video else f"(n, {c}, {s}, {s})"
    if x.ndim != (5 if video else 4) or x.shape[-3:] != (c, s, s) or 0 in x.shape:
        raise ValueError(
            f"--data {path} has shape {x.shape}; the {'video' if video else 'image'} model reads "
            f"{want} (n >= 1; in_channels={c}, img_size={s})"
        )


def _conditioning(args, cfg, n: int) -> np.ndarray | None:
    """``--cond`` or one-hot ``--labels``, ``(n, txt_size, txt_dim)``, or ``None``."""
    y_all = None
    if cfg.txt_dim == 0 and (args.cond or args.labels):
        raise ValueError("the model is unconditional (txt_dim=0): --cond and --labels do not apply")
    if args.cond:
        y_all = _load(args.cond, "--cond")
        if y_all.ndim != 3 or y_all.shape[1:] != (cfg.txt_size, cfg.txt_dim):
            raise ValueError(
                f"--cond {args.cond} has shape {y_all.shape}, the model reads "
                f"(n, txt_size={cfg.txt_size}, txt_dim={cfg.txt_dim})"
            )
    elif args.labels:
        labels = _load(args.labels, "--labels").astype(np.int64).reshape(-1)
        if labels.min() < 0 or labels.max() >= cfg.txt_dim:
            raise ValueError(f"labels must lie in [0, {cfg.txt_dim}), got [{labels.min()}, {labels.max()}]")
        from starflow_jax.flow.labels import one_hot_labels

        y_all = np.asarray(one_hot_labels(jnp.asarray(labels), cfg.txt_dim - 1))
    if y_all is not None and y_all.shape[0] != n:
        raise ValueError(f"conditioning has {y_all.shape[0]} rows, data has {n}")
    if cfg.txt_dim > 0 and y_all is None:
        raise ValueError(f"the model is conditioned (txt_dim={cfg.txt_dim}): give --cond or --labels")
    return y_all


def run(args) -> int:
    # the output, the data and the conditioning are checked before the model is loaded
    check_outputs([args.json], args.overwrite)
    if args.cond and args.labels:
        raise ValueError("give --cond or --labels, not both")
    if args.data is None and not args.workdir:
        raise ValueError("give --data (the held-out default exists only for digits workdirs)")
    if args.data is None:
        config, model = model_source.load_model(args)
        return _heldout_digits(args, config, model)
    config = model_source.read_config(args)
    cfg = model_config(config)
    x_all = _load(args.data, "--data")
    check_data(x_all, args.data, config, cfg)
    if not np.all(np.isfinite(x_all)):
        raise ValueError(f"{args.data} holds NaN or Inf values")
    n = x_all.shape[0]
    y_all = _conditioning(args, cfg, n)
    _, model = model_source.load_model(args)

    @nnx.jit
    def batch_nll(model, x, y):
        out = model(x, y)
        if x.ndim == 5:  # video: (b, t), per frame
            return model.nll_per_frame(out)
        return nll_per_example(out.z, out.logdets)[:, None]

    total = 0.0
    for i in range(0, n, args.batch_size):
        x = jnp.asarray(x_all[i : i + args.batch_size], jnp.float32)
        y = None if y_all is None else jnp.asarray(y_all[i : i + args.batch_size], jnp.float32)
        total = total + np.asarray(batch_nll(model, x, y), np.float64).sum(0)
    per_frame = total / n
    nll = float(np.mean(per_frame))
    bpd = float(bits_per_dim(nll, args.data_scale))
    print(f"examples: {n}")
    print(f"nll per dim (nats, no Gaussian constant): {nll:.6f}")
    print(f"bits per dim: {bpd:.6f}")
    result = dict(examples=n, nll=nll, bits_per_dim=bpd, data_scale=args.data_scale)
    if x_all.ndim == 5:
        frames = [float(bits_per_dim(float(v), args.data_scale)) for v in per_frame]
        _print_frames(frames)
        result.update(bits_per_dim_per_frame=frames, nll_per_frame=[float(v) for v in per_frame])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _print_frames(frames: list[float]) -> None:
    """Per-frame bits per dimension of a video model (frame k given the frames before it)."""
    print("bits per dim per frame: " + " ".join(f"{v:.6f}" for v in frames))
    if len(frames) > 1:
        print(f"bits per dim, frame 1: {frames[0]:.6f}; later frames (mean): {float(np.mean(frames[1:])):.6f}")


def _heldout_digits(args, config, model) -> int:
    """Held-out bits per dimension of a training run's held-out split (as the training
    loop reports it)."""
    if "data" not in config or "train" not in config:
        raise ValueError("this workdir holds no training config: give --data")
    from starflow_jax.data.sources import make_data
    from starflow_jax.train import loop
    from starflow_jax.train.program import step_settings

    data = make_data(config)
    heldout = data.heldout
    if heldout is None:
        raise ValueError("this run's data has no held-out split: give --data")
    graphdef, params = nnx.split(model)
    held = loop.heldout_bpd(config, graphdef, params, heldout, step_settings(config, data.num_classes))
    bpd = held.bpd
    print(f"examples: {len(heldout)}")
    t = config.train
    if t.noise_type == "uniform":
        noise = f"uniform dequantisation, {int(t.levels)} levels"
    else:
        noise = f"noise_std {float(t.noise_std):g}"
    print(f"held-out bits per dim ({noise}): {bpd:.6f}")
    result = dict(examples=len(heldout), bits_per_dim=bpd)
    if held.frames is not None:
        _print_frames(list(held.frames))
        result["bits_per_dim_per_frame"] = list(held.frames)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
