"""Write the reference parity cases (``*.npz``) by running the PyTorch reference.

    python tests/reference_cases/generate.py --reference /path/to/ml-starflow --out tests/reference_cases

``--reference`` is a checkout of github.com/apple/ml-starflow; its ``transformer_flow`` is
imported from there at run time (its code is not part of this project). Needs torch, einops
and tqdm. Each case is one small ``transformer_flow.Model`` with seeded random weights and
inputs; the expected outputs come from a float64 run of the reference, and ``meta.ref32_err``
records how far the reference's own float32 run lands from them. The file format is the
one ``starflow_jax.interop.reference_cases`` reads (``tests/reference_cases/README.md``).

Everything is seeded and the files are written with fixed zip timestamps, so a rerun on the
same torch gives the same bytes. ``--replay DIR`` instead recomputes the expected outputs
of the cases in ``DIR`` from their own weights and inputs and prints how far they are from
what is stored there (a check of this script against cases made elsewhere); it writes nothing.

How the float64 run is made: the reference builds and calls its model in the default dtype,
but casts to float32 in places with ``Tensor.float()`` (norms, the affine step, sampling).
For the float64 run the default dtype is float64 and ``Tensor.float`` casts to the default
dtype instead, for the duration of the run only; the model is rebuilt under that setting
(its RoPE frequencies are computed at construction) and given the float32 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np

SOURCE = "apple/ml-starflow transformer_flow.Model; expected values from a float64 run"

FORWARD = [("forward", "forward", {})]
SAMPLING = [
    ("reverse", "reverse", {}),
    ("reverse", "reverse_cfg", {"guidance": 2.0}),
    ("reverse", "reverse_cfg_annealed_temp", {"guidance": 1.5, "annealed_guidance": True, "attn_temp": 0.9}),
]


def _jacobi(block, guided=True):
    ops = [("jacobi", "jacobi", {"jacobi_block_size": block, "jacobi_th": 1e-16, "jacobi_max_iter": 200})]
    if guided:
        ops.append(
            (
                "jacobi",
                "jacobi_cfg",
                {"guidance": 2.0, "jacobi_block_size": block, "jacobi_th": 1e-16, "jacobi_max_iter": 200},
            )
        )
    return ops


_T2I = dict(
    in_channels=4,
    img_size=8,
    patch_size=1,
    channels=64,
    num_blocks=3,
    layers_per_block=[1, 1, 2],
    head_dim=32,
    rope=1,
    sos=1,
    txt_size=5,
    txt_dim=12,
    cond_top_only=1,
    use_softplus=1,
    use_final_norm=1,
    soft_clip=4.0,
    seq_order="L2R",
)

# name -> (seed, Model kwargs, x shape, ops). Batch 2 everywhere; y is (2, txt_size, txt_dim).
CASES = {
    # class-conditional pixels: patch 2, LayerNorm + GELU MLP with biases, exp scales, no SOS
    # (the first token is shifted in), conditioning in every block, R2L order, 1 head of 32
    # on 48 channels (q size != channels)
    "pixel_classcond": (
        11,
        dict(
            in_channels=3,
            img_size=8,
            patch_size=2,
            channels=48,
            num_blocks=4,
            layers_per_block=[2],
            head_dim=32,
            rope=1,
            sos=0,
            txt_size=1,
            txt_dim=11,
            cond_top_only=0,
            use_softplus=0,
            soft_clip=2.0,
            seq_order="R2L",
        ),
        (2, 3, 8, 8),
        FORWARD + SAMPLING,
    ),
    # text to image: text prefix (5 tokens) in the top block only, SOS, softplus scales,
    # final RMSNorm, 3D RoPE with a text axis, 2 heads, Jacobi sampling
    "t2i_small": (12, _T2I, (2, 4, 8, 8), FORWARD + SAMPLING + _jacobi(8)),
    # gemma-style: wider top block (3 heads) than the lower ones, RMSNorm everywhere,
    # SwiGLU, QK-norm, post-norms, no biases
    "gemma_style_top": (
        13,
        dict(
            _T2I,
            channels=32,
            top_block_channels=96,
            num_heads=None,
            num_kv_heads=None,
            use_swiglu=1,
            use_qk_norm=1,
            use_post_norm=1,
            use_bias=0,
            norm_type="rms_norm",
        ),
        (2, 4, 8, 8),
        FORWARD + SAMPLING + _jacobi(8),
    ),
    # video: temporal-causal top block, frame-local shallow blocks, a conditional learnable
    # self-denoiser with a block-causal window
    "video_small": (
        14,
        dict(
            _T2I,
            img_size=4,
            channels=32,
            temporal_causal=1,
            shallow_block_local=1,
            learnable_self_denoiser=1,
            conditional_denoiser=1,
            denoiser_window=2,
        ),
        (2, 3, 4, 4, 4),
        FORWARD + [("denoiser", "denoiser", {})] + SAMPLING[:2] + _jacobi(4, guided=False),
    ),
}


# ----------------------------------------------------------------------------- the reference


def import_reference(path):
    sys.path.insert(0, str(pathlib.Path(path).resolve()))
    import torch
    import transformer_flow

    if not torch.distributed.is_initialized():  # its jacobi all-reduces a flag
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    return torch, transformer_flow


@contextlib.contextmanager
def compute_dtype(torch, dtype):
    """Default dtype ``dtype``; for float64 also ``Tensor.float()`` casts to float64."""
    old_default, old_float = torch.get_default_dtype(), torch.Tensor.float
    torch.set_default_dtype(dtype)
    if dtype == torch.float64:
        torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.float = old_float
        torch.set_default_dtype(old_default)


def random_weights(torch, model, seed):
    """Seeded values (numpy, so independent of torch's generator) for every parameter: the
    reference's kind of initialisation, then everything perturbed so that no weight is at
    its special initial value (zero output projections, unit norms). Linear weights and
    biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) + N(0, 0.05^2), output projection weights
    N(0, 0.05^2), LayerNorm weights 1 + N(0, 0.05^2), RMSNorm weights (unit offset) and
    LayerNorm biases N(0, 0.05^2), other parameters (SOS embeddings) N(0, 1)."""
    rng = np.random.default_rng(seed)
    values = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            shape = tuple(p.shape)
            noise = 0.05 * rng.standard_normal(shape)
            if isinstance(module, torch.nn.Linear):
                if pname == "weight" and mname.endswith("proj_out"):
                    v = noise
                else:
                    bound = 1.0 / np.sqrt(module.in_features)
                    v = rng.uniform(-bound, bound, shape) + noise
            elif isinstance(module, torch.nn.LayerNorm):
                v = (1.0 if pname == "weight" else 0.0) + noise
            elif type(module).__name__ == "RMSNorm":
                v = noise
            else:
                v = rng.standard_normal(shape)
            values[f"{mname}.{pname}" if mname else pname] = v.astype(np.float32)
    assert set(values) == {k for k, _ in model.named_parameters()}
    return values


def build(torch, tf, kwargs, dtype, state_dict):
    with compute_dtype(torch, dtype):
        model = tf.Model(**kwargs)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in state_dict.items()}, strict=True)
    return model.eval()


def run_op(torch, model, dtype, op, inputs):
    """The outputs of one op (numpy, float64) with the reference in ``dtype``."""
    kind, name, kwargs = op
    t = {k: torch.from_numpy(v).to(dtype) for k, v in inputs.items()}
    cond = model.blocks[-1].txt_dim > 0
    with compute_dtype(torch, dtype):
        if kind == "forward":
            model.zero_grad(set_to_none=True)
            x = t["x"].clone().requires_grad_(True)
            z, _, outputs, logdets = model(x, t["y"] if cond else None)
            loss = model.get_loss(z, logdets)["loss"]
            loss.backward()
            out = {"z": z, "loss": loss, "grad_x": x.grad}
            out.update({f"logdet/{i}": v for i, v in enumerate(logdets)})
            out.update({f"output/{i}": v for i, v in enumerate(outputs)})
            out.update({f"grad/{k}": p.grad for k, p in model.named_parameters() if p.grad is not None})
        elif kind == "denoiser":
            with torch.no_grad():
                y = t["y"] if model.learnable_self_denoiser.txt_dim > 0 else None
                out = {"out": model(t["x"], y, denoiser=True)}
        else:
            y = t["y"] if cond else None
            if cond and kwargs.get("guidance", 0) > 0:
                y = torch.cat([t["y"], t["y_null"]], 0)
            with torch.no_grad():
                out = {"x": model(t["noise"], y, reverse=True, jacobi=kind == "jacobi", **kwargs)}
    return {k: v.detach().to(torch.float64).numpy() for k, v in out.items()}


def relative_error(ours, expected):
    return float(np.max(np.abs(ours - expected)) / max(float(np.max(np.abs(expected))), 1e-12))


def compute(torch, tf, kwargs, state_dict, inputs, ops):
    """Expected outputs (float64 run) and the float32 run's error against them."""
    m64 = build(torch, tf, kwargs, torch.float64, state_dict)
    m32 = build(torch, tf, kwargs, torch.float32, state_dict)
    expected, ref32_err, op_meta = {}, {}, []
    for op in ops:
        kind, name, kw = op
        e64 = run_op(torch, m64, torch.float64, op, inputs)
        e32 = run_op(torch, m32, torch.float32, op, inputs)
        keys = sorted(f"{name}/{k}" for k in e64)
        for k in e64:
            expected[f"{name}/{k}"] = e64[k]
            ref32_err[f"{name}/{k}"] = relative_error(e32[k], e64[k])
        used = ["input/x", "input/y"] if kind in ("forward", "denoiser") else ["input/noise", "input/y"]
        if kw.get("guidance", 0) > 0:
            used.append("input/y_null")
        op_meta.append({"op": kind, "name": name, "kwargs": kw, "inputs": used, "outputs": keys})
    return expected, ref32_err, op_meta


def make_case(torch, tf, name, commit):
    seed, kwargs, x_shape, ops = CASES[name]
    torch.manual_seed(seed)  # construction draws from torch's generator; every value is replaced below
    with compute_dtype(torch, torch.float32):
        model = tf.Model(**kwargs)
    values = random_weights(torch, model, seed)
    state_dict = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    state_dict.update(values)  # parameters seeded; the deprecated buffers as the reference makes them
    rng = np.random.default_rng(seed + 1000)
    y_shape = (x_shape[0], kwargs["txt_size"], kwargs["txt_dim"])
    inputs = {
        "x": rng.standard_normal(x_shape).astype(np.float32),
        "noise": rng.standard_normal(x_shape).astype(np.float32),
        "y": rng.standard_normal(y_shape).astype(np.float32),
        "y_null": np.zeros(y_shape, np.float32),
    }
    expected, ref32_err, op_meta = compute(torch, tf, kwargs, state_dict, inputs, ops)
    meta = dict(
        name=name,
        model_kwargs=kwargs,
        x_shape=list(x_shape),
        y_shape=list(y_shape),
        ops=op_meta,
        ref32_err=ref32_err,
        seed=seed,
        source=SOURCE,
        reference_commit=commit,
    )
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"param/{k}": v for k, v in state_dict.items()})
    arrays.update({f"input/{k}": v for k, v in inputs.items()})
    arrays.update(expected)
    return arrays


def write_npz(path, arrays):
    """What ``np.savez_compressed`` writes, with fixed timestamps (reruns give the same bytes)."""
    tmp = pathlib.Path(str(path) + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def replay(torch, tf, directory):
    """Recompute the cases in ``directory`` from their stored weights and inputs."""
    worst_all = 0.0
    for path in sorted(pathlib.Path(directory).glob("*.npz")):
        with np.load(path) as f:
            d = {k: f[k] for k in f.files}
        meta = json.loads(str(d["meta"]))
        state_dict = {k[len("param/") :]: v for k, v in d.items() if k.startswith("param/")}
        inputs = {k[len("input/") :]: v for k, v in d.items() if k.startswith("input/")}
        ops = [(o["op"], o["name"], o["kwargs"]) for o in meta["ops"]]
        expected, ref32_err, _ = compute(torch, tf, meta["model_kwargs"], state_dict, inputs, ops)
        for op in meta["ops"]:
            errs = {k: relative_error(expected[k], d[k]) for k in op["outputs"]}
            k = max(errs, key=errs.get)
            worst_all = max(worst_all, errs[k])
            r32 = max(ref32_err[k] for k in op["outputs"])
            print(f"{meta['name']:<18}{op['name']:<28}worst {errs[k]:.2e} ({k}); float32 run err {r32:.2e}")
    print(f"worst relative difference from the stored expectations: {worst_all:.2e}")
    return worst_all


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference", required=True, help="checkout of github.com/apple/ml-starflow")
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent), help="directory for the .npz files")
    p.add_argument("--only", nargs="*", choices=sorted(CASES), help="just these cases")
    p.add_argument("--replay", metavar="DIR", help="recompute the cases in DIR and compare; write nothing")
    args = p.parse_args(argv)
    torch, tf = import_reference(args.reference)
    torch.set_num_threads(1)  # the same summation order on every machine
    if args.replay:
        # the float32 run lands ~1e-7 away: agreement far below that is a match
        return 0 if replay(torch, tf, args.replay) < 1e-6 else 1
    commit = subprocess.run(
        ["git", "-C", args.reference, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or sorted(CASES):
        arrays = make_case(torch, tf, name, commit or "unknown")
        write_npz(out / f"{name}.npz", arrays)
        worst = max(json.loads(str(arrays["meta"]))["ref32_err"].values())
        print(f"{name}: {(out / f'{name}.npz').stat().st_size / 1e6:.2f} MB, worst float32 run err {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
