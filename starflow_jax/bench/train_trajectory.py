"""``starflow-jax bench train --trajectory N``: this project's training program and the
PyTorch reference's training step, as its ``train.py`` performs it, run side by side for
``N`` updates from the same initial weights on the same batches with the same random
draws, compared after every update (float32).

The JAX side is the program ``train`` builds (``train.program``): its optimizer, schedules,
clipping, skip rule, EMA, noise, label / caption dropout, latent-norm regularisation and
learnable denoiser. Its draws come from ``train.step.step_draws`` with the key the step
itself uses, and ``drop_image`` from the loop's own decision
(``data.pipeline.drop_image_decision``); they are written once and the reference reads
them. The reference runs in a child process (``bench.common.reference_rows_in_child``) that
imports its ``transformer_flow`` and ``utils/training.py`` from the checkout, and performs
``train.py``'s step: ``x`` plus the noise, the first frame dropped on a ``drop_image`` step
(conditioned on the ``"(extend) "`` captions), labels or captions dropped (the one-hot null
label, or the null caption embedding, zeros, that the project trains with), forward,
``get_loss`` plus the latent-norm penalty, backward, the denoiser's score target
``x.grad * numel * noise_std`` and its MSE, ``clip_grad_norm_`` of each optimizer's
parameters, the skip rule, AdamW (betas (0.9, 0.95), weight decay 1e-4 on every flow
parameter; torch's defaults and weight decay 1e-4 for the denoiser), its
``CosineLRSchedule`` stepped after the flow's optimizer and before the denoiser's.

Where the published ``train.py`` cannot be followed, the harness does what it evidently
means, and says so here:

* ``needs_update = False  # (it + 1) % grad_accum_steps == 0``: as published it never
  updates; the harness updates after every batch (``grad_accum`` 1, the commented rule).
* It keeps no EMA: the harness keeps one of the reference's parameters,
  ``ema = d * ema + (1 - d) * p`` after each update that is not skipped (``train.ema_decay``).
* It never zeroes the learnable denoiser's gradients (only the flow's): with
  ``train.denoiser_accumulate_grads`` the harness does the same (and so does the project),
  without it the harness zeroes them before each step.
* Its uniform dequantisation is written for 256 levels; the harness applies it with
  ``train.levels`` (17 for the digits).
"""

from __future__ import annotations

import math
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow_jax.bench.common import print_table, reference_child_output, reference_rows_in_child, write_json
from starflow_jax.config import load_config
from starflow_jax.config.training import SECTIONS

# what the reference's train.py fixes (the project makes them settings)
REFERENCE_FIXED = dict(b1=0.9, b2=0.95, weight_decay=1e-4, denoiser_lr=1e-4, denoiser_min_lr=1e-6)

COLUMNS = [
    ("step", "step", "d"),
    ("loss_jax", "loss_jax", ".6f"),
    ("loss_ref", "loss_ref", ".6f"),
    ("loss_rel", "loss_rel", ".1e"),
    ("grad_norm_jax", "gnorm_jax", ".4g"),
    ("grad_norm_rel", "gnorm_rel", ".1e"),
    ("lr_jax", "lr", ".3e"),
    ("lr_rel", "lr_rel", ".1e"),
    ("params_rel", "params_rel", ".1e"),
    ("params_max_rel", "tensor_max", ".1e"),
    ("ema_rel", "ema_rel", ".1e"),
    ("denoiser_loss_rel", "den_loss_rel", ".1e"),
    ("denoiser_grad_norm_rel", "den_gn_rel", ".1e"),
    ("skipped_jax", "skip_jax", "d"),
    ("skipped_ref", "skip_ref", "d"),
]

SUMMARY_KEYS = [
    "loss_rel",
    "grad_norm_rel",
    "lr_rel",
    "params_rel",
    "params_max_rel",
    "ema_rel",
    "ema_max_rel",
    "denoiser_loss_rel",
    "denoiser_grad_norm_rel",
    "denoiser_lr_rel",
]


def trajectory_config(config_path: str, overrides, batch: int | None):
    """The training config the comparison runs: the file's with ``overrides``, sections it
    lacks at their defaults, float32, ``batch`` (default: the config's batch up to 8)."""
    config = load_config(config_path, overrides)
    for name, defaults in SECTIONS.items():
        config[name] = ml_collections.ConfigDict({**defaults, **(config[name].to_dict() if name in config else {})})
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    t = config.train
    t.batch_size = int(batch or min(int(t.batch_size), 8))
    if int(t.grad_accum) != 1:
        raise ValueError(
            f"--trajectory compares single-batch updates: train.grad_accum must be 1, got {t.grad_accum} "
            "(the reference's train.py never updates with accumulation: needs_update = False)"
        )
    for key, value in REFERENCE_FIXED.items():
        if key.startswith("denoiser") and not bool(config.model.learnable_self_denoiser):
            continue
        if not math.isclose(float(t[key]), value, rel_tol=1e-12):
            raise ValueError(
                f"the reference's train.py fixes {key} = {value}; --trajectory needs train.{key}={value}, got {t[key]}"
            )
    if float(t.secondary_ratio) > 0:
        raise ValueError("--trajectory trains on one data source: set train.secondary_ratio=0")
    return config


def _batches(config, num_classes: int, layout: dict, steps: int, seed: int):
    """``steps`` batches (numpy): the embedded digits' training split in order for the
    digits, else seeded Gaussian latents and caption embeddings (and their ``"(extend) "``
    captions when frames can be dropped)."""
    b = int(config.train.batch_size)
    d = config.data
    rng = np.random.default_rng(seed)
    if str(d.name) == "digits":
        from starflow_jax.data.digits import load_digits_splits

        train, _ = load_digits_splits(int(d.num_train), int(d.split_seed))
        out = []
        for s in range(steps):
            rows = (s * b + np.arange(b)) % len(train)
            out.append(dict(image=train.images[rows], label=train.labels[rows]))
        return out
    out = []
    for _ in range(steps):
        batch = {}
        for key, (shape, dtype) in layout.items():
            if key == "label":
                batch[key] = rng.integers(0, num_classes, size=(b,)).astype(np.int32)
            else:
                batch[key] = rng.normal(size=(b,) + tuple(shape)).astype(dtype)
        if "cond" in batch and float(config.train.drop_image) > 0:
            batch["cond_extend"] = rng.normal(size=batch["cond"].shape).astype(np.float32)
        out.append(batch)
    return out


def _flat(state) -> dict[str, np.ndarray]:
    from starflow_jax.interop.state_dict import to_reference

    return {k: np.asarray(v, np.float32) for k, v in to_reference(state).items()}


def run_jax(config, steps: int, directory: pathlib.Path) -> list[dict]:
    """The project's program for ``steps`` updates; writes ``inputs.npz`` (the initial
    weights in the reference's names), ``step_XXXX.npz`` (the step's batch, draws and the
    parameters and EMA after it) and returns the step's metrics."""
    from starflow_jax.data.pipeline import drop_first_frame, drop_image_decision
    from starflow_jax.parallel.mesh import make_mesh
    from starflow_jax.train import step as S
    from starflow_jax.train.optimizer import lr_schedule
    from starflow_jax.train.program import batch_layout, build_program

    t = config.train
    num_classes, layout = batch_layout(config)
    program = build_program(config, make_mesh(dict(config.mesh)), num_classes)
    hp = program.hp
    den_sched = (
        lr_schedule(float(t.denoiser_lr), float(t.denoiser_min_lr), int(t.warmup_steps), int(t.steps), offset=1)
        if hp.denoiser
        else None
    )
    state = program.init_state()
    np.savez(directory / "inputs.npz", **_flat(state.params))
    rows = []
    for s, batch in enumerate(_batches(config, num_classes, layout, steps, int(t.seed))):
        dropped = bool(
            float(t.drop_image) > 0
            and np.ndim(batch["image"]) == 5
            and drop_image_decision(int(t.seed), s, float(t.drop_image))
        )
        full_image = batch["image"]
        batch = drop_first_frame(batch, dropped) if float(t.drop_image) > 0 else batch
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in ("image", "label", "cond")}
        draws = S.step_draws(S.step_key(state.rng, state.step), batch, hp)
        state, m = program.step(state, jax.device_put(batch, program.batch_shardings(batch)))
        noise = np.asarray(draws["noise"])
        if dropped:  # the reference adds noise to the whole clip, then drops its first frame
            noise = np.concatenate([np.zeros_like(noise[:, :1]), noise], axis=1)
        record = dict(image=full_image, noise=noise, drop_image=np.bool_(dropped))
        if draws["drop"] is not None:
            record["drop"] = np.asarray(draws["drop"])
        for key in ("label", "cond"):  # on a drop_image step, cond holds the "(extend) " captions
            if key in batch:
                record[key] = np.asarray(batch[key])
        params = {f"p/{k}": v for k, v in _flat(state.params).items()}
        ema = {} if state.ema is None else {f"e/{k}": v for k, v in _flat(state.ema).items()}
        np.savez(directory / f"step_{s:04d}.npz", **record, **params, **ema)
        row = dict(
            step=s + 1,
            loss=float(m["loss"]),
            grad_norm=float(m["grad_norm"]),
            lr=float(m["lr"]),
            skipped=int(m["skipped"]),
        )
        if hp.denoiser:
            row.update(
                denoiser_loss=float(m["denoiser_loss"]),
                denoiser_grad_norm=float(m["denoiser_grad_norm"]),
                denoiser_lr=float(den_sched(s)),
            )
        rows.append(row)
    return rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _tree_rel(jax_flat: dict, ref: dict) -> tuple[float, float, str]:
    """``(global, max per tensor, the tensor)`` relative L2 differences."""
    num = den = 0.0
    worst, name = 0.0, ""
    for k, r in ref.items():
        d = float(np.sum((jax_flat[k].astype(np.float64) - r) ** 2))
        n = float(np.sum(r.astype(np.float64) ** 2))
        num, den = num + d, den + n
        rel = math.sqrt(d / max(n, 1e-30))
        if rel > worst:
            worst, name = rel, k
    return math.sqrt(num / max(den, 1e-30)), worst, name


def run_reference(path: str, config, steps: int, directory: pathlib.Path) -> list[dict]:
    """The reference's training step (``train.py``, ``bench.reference_train``) on the inputs
    ``run_jax`` wrote, compared to the JAX parameters and EMA after each update."""
    import torch

    from starflow_jax.bench.reference_train import ReferenceTrainer
    from starflow_jax.train.program import batch_layout

    torch.use_deterministic_algorithms(True)
    num_classes, _ = batch_layout(config)
    with np.load(directory / "inputs.npz") as f:
        trainer = ReferenceTrainer(path, config, {k: f[k] for k in f.files}, num_classes)
    rows = []
    for s in range(steps):
        with np.load(directory / f"step_{s:04d}.npz") as f:
            rec = {k: f[k] for k in f.files}
        row = dict(step=s + 1)
        row.update(
            trainer.step(
                rec["image"],
                rec["noise"],
                bool(rec["drop_image"]),
                label=rec.get("label"),
                cond=rec.get("cond"),
                drop=rec.get("drop"),
            )
        )
        if "lr" in row:  # an update was made (train.py skips a NaN loss's batch altogether)
            jax_params = {k[2:]: rec[k] for k in rec if k.startswith("p/")}
            row["params_rel"], row["params_max_rel"], row["params_max_tensor"] = _tree_rel(jax_params, trainer.params())
            ema = trainer.ema()
            if ema is not None and any(k.startswith("e/") for k in rec):
                jax_ema = {k[2:]: rec[k] for k in rec if k.startswith("e/")}
                row["ema_rel"], row["ema_max_rel"], row["ema_max_tensor"] = _tree_rel(jax_ema, ema)
        rows.append(row)
    return rows


def compare(jax_rows: list[dict], ref_rows: list[dict]) -> list[dict]:
    out = []
    for j, r in zip(jax_rows, ref_rows):
        row = dict(step=j["step"])
        for key in ("loss", "grad_norm", "lr", "denoiser_loss", "denoiser_grad_norm", "denoiser_lr", "skipped"):
            if key in j:
                row[f"{key}_jax"] = j[key]
            if key in r:
                row[f"{key}_ref"] = r[key]
            if key in j and key in r and key != "skipped":
                row[f"{key}_rel"] = _rel(j[key], r[key])
        for key in ("params_rel", "params_max_rel", "params_max_tensor", "ema_rel", "ema_max_rel", "ema_max_tensor"):
            if key in r:
                row[key] = r[key]
        out.append(row)
    return out


def summary(rows: list[dict]) -> dict:
    """The largest of each relative difference over the steps."""
    return {k: max(r[k] for r in rows if k in r) for k in SUMMARY_KEYS if any(k in r for r in rows)}


def run(args) -> int:
    steps = int(args.trajectory)
    if steps < 1:
        raise ValueError(f"--trajectory needs a number of updates >= 1, got {steps}")
    if not args.reference and not reference_child_output():
        raise ValueError("--trajectory compares with the reference: give --reference PATH (apple/ml-starflow checkout)")
    config = trajectory_config(args.config, args.overrides, args.batch)
    if reference_child_output():  # the child: the reference's steps on the inputs the parent wrote
        rows = run_reference(args.reference, config, steps, pathlib.Path(args.trajectory_inputs))
        write_json(reference_child_output(), rows)
        return 0
    jax.config.update("jax_default_matmul_precision", "highest")
    with tempfile.TemporaryDirectory() as d:
        jax_rows = run_jax(config, steps, pathlib.Path(d))
        argv = [
            "bench",
            "train",
            "--config",
            str(args.config),
            *[a for o in args.overrides for a in ("--set", o)],
            "--batch",
            str(config.train.batch_size),
            "--trajectory",
            str(steps),
            "--trajectory-inputs",
            d,
            "--reference",
            args.reference,
        ]
        ref_rows = reference_rows_in_child(argv)
    rows = compare(jax_rows, ref_rows)
    t = config.train
    print(
        f"trajectory of {steps} updates, config {args.config} ({' '.join(args.overrides) or 'no overrides'}): "
        f"batch {t.batch_size}, lr {t.lr} (warmup {t.warmup_steps} of {t.steps}), clip {t.grad_clip}, "
        f"ema {t.ema_decay}, noise {t.noise_type} {t.noise_std}, drop_label {t.drop_label}, "
        f"drop_image {t.drop_image}, latent_norm {t.latent_norm_regularization}, "
        f"denoiser {bool(config.model.learnable_self_denoiser)}; float32; relative differences jax vs reference"
    )
    print_table(rows, COLUMNS)
    worst = summary(rows)
    print("max over the steps: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    write_json(args.json, dict(config=str(args.config), overrides=list(args.overrides), steps=rows, max=worst))
    return 0
