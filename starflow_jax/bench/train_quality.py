"""``starflow-jax bench train --quality``: this project's training program and the
reference's ``train.py`` step (``bench.reference_train``) train the same model from the same
initial weights on the embedded digits' training split (or the moving digits' clips), in the
same batch order, each with its own random draws (noise, label drops: JAX's, and torch's /
Python's as ``train.py`` draws them), for the same number of updates, or for the same
wall-clock budget; held-out bits/dim at step 0 and the given steps (the whole held-out split
under one shared dequantisation draw; for clips also frame 1's and the later frames', the
reference's read from the NLL of each clip's first k frames: ``prefix_frame_nll``) and the
training seconds it took to get there (evaluations and the JAX step's compilation excluded;
the compilation is reported apart), side by side, with a PNG plot."""

from __future__ import annotations

import pathlib
import random
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np

from starflow_jax.bench.common import print_table, reference_child_output, reference_rows_in_child, write_json
from starflow_jax.config import model_config
from starflow_jax.config.reference_args import without_ours_only

COLUMNS = [
    ("step", "step", "d"),
    ("bpd_jax", "bpd_jax", ".4f"),
    ("seconds_jax", "s_jax", ".1f"),
    ("bpd_ref", "bpd_ref", ".4f"),
    ("seconds_ref", "s_ref", ".1f"),
]
# clips: the clip's bits/dim, frame 1's and the later frames' (each given the frames before it)
VIDEO_COLUMNS = COLUMNS[:2] + [
    ("bpd_frame1_jax", "frame1_jax", ".4f"),
    ("bpd_later_jax", "later_jax", ".4f"),
    ("seconds_jax", "s_jax", ".1f"),
    ("bpd_ref", "bpd_ref", ".4f"),
    ("bpd_frame1_ref", "frame1_ref", ".4f"),
    ("bpd_later_ref", "later_ref", ".4f"),
    ("seconds_ref", "s_ref", ".1f"),
]


def quality_config(config_path: str, overrides, batch: int | None):
    from starflow_jax.bench.train_trajectory import trajectory_config

    config = trajectory_config(config_path, overrides, None)
    config.train.batch_size = int(batch or load_batch(config_path, overrides))
    if str(config.data.name) not in ("digits", "moving_digits"):
        raise ValueError(
            "--quality trains on the embedded digits: a digits or moving_digits config (data.name), "
            f"got {config.data.name}"
        )
    return config


def load_batch(config_path, overrides) -> int:
    from starflow_jax.config import load_config

    return int(load_config(config_path, overrides).train.batch_size)


def parse_points(text: str) -> list[int]:
    try:
        points = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError as e:
        raise ValueError(f"--quality-steps is a comma-separated list of step counts, got {text!r}") from e
    if not points or points[0] < 1:
        raise ValueError(f"--quality-steps needs step counts >= 1, got {text!r}")
    return points


class Split(NamedTuple):
    images: np.ndarray  # (n, c, h, w), or clips (n, t, c, h, w)
    labels: np.ndarray


def num_classes(config) -> int:
    """The classes the model is conditioned on: the digits' 10, or the moving digits' labels
    (10 x the velocities with ``data.motion_labels``)."""
    if str(config.data.name) == "moving_digits":
        from starflow_jax.data.moving_digits import config_classes

        return config_classes(config)
    from starflow_jax.data.digits import NUM_CLASSES

    return NUM_CLASSES


def _splits(config) -> tuple[Split, Split]:
    """The training and held-out splits: the digits, or the moving digits' clips."""
    if str(config.data.name) == "moving_digits":
        from starflow_jax.data.sources import make_data

        data = make_data(config)
        # every training clip the run draws from (data.clip_variants per digit), not only the first
        train = [data.train[i] for i in range(len(data.train))]
        return (
            Split(np.stack([r["image"] for r in train]), np.array([r["label"] for r in train], np.int32)),
            # the clips' own labels (digit + 10 x velocity index with data.motion_labels)
            Split(data.heldout_images, np.array([data.heldout[i]["label"] for i in range(len(data.heldout_images))])),
        )
    from starflow_jax.data.digits import load_digits_splits

    d = config.data
    return tuple(Split(s.images, s.labels) for s in load_digits_splits(int(d.num_train), int(d.split_seed)))


def _plan(config, steps: int):
    """The batch order (a seeded permutation of the training split per epoch), the held-out
    split and its dequantisation draw, shared by both sides."""
    t = config.train
    train, heldout = _splits(config)
    b = int(t.batch_size)
    rng = np.random.default_rng(int(t.seed))
    per_epoch = len(train.images) // b
    order = []
    while len(order) < steps:
        perm = rng.permutation(len(train.images))
        order += [perm[i * b : (i + 1) * b] for i in range(per_epoch)]
    u = np.random.default_rng(1234).uniform(size=heldout.images.shape).astype(np.float32)
    return train, heldout, np.stack(order[:steps]), u


def _bpd(nll: np.ndarray, config) -> float:
    from starflow_jax.flow.loss import bits_per_dim
    from starflow_jax.train.loop import data_scale

    return float(bits_per_dim(float(np.mean(nll)), data_scale(config)))


def _row(step: int, seconds: float, nll: np.ndarray, config) -> dict:
    """A row of held-out results from per-example NLLs ``(n,)``, or per frame ``(n, t)``
    (clips: the clip's bits/dim is the frames' mean; frame 1's and the later frames' apart)."""
    row = dict(step=step, bpd=_bpd(nll, config), seconds=seconds)
    if nll.ndim == 2:
        row["bpd_frame1"] = _bpd(nll[:, 0], config)
        row["bpd_later"] = _bpd(nll[:, 1:], config)
    return row


def prefix_frame_nll(nll_of_prefix, frames: int) -> np.ndarray:
    """Per-frame NLL ``(n, t)`` of a time-causal model from the NLL per dimension of each
    clip's first ``k`` frames (``nll_of_prefix(k) -> (n,)``, k = 1..t): frame ``k``'s is
    ``k m_k - (k - 1) m_{k-1}``. Needs nothing inside the model (the reference's is read
    this way)."""
    means = [np.zeros(())] + [np.asarray(nll_of_prefix(k), np.float64) for k in range(1, frames + 1)]
    return np.stack([k * means[k] - (k - 1) * means[k - 1] for k in range(1, frames + 1)], axis=1)


def run_jax(config, points: list[int], budget: float | None, directory: pathlib.Path):
    from flax import nnx

    from starflow_jax.flow.labels import one_hot_labels
    from starflow_jax.flow.loss import nll_per_example
    from starflow_jax.flow.noise import apply_noise
    from starflow_jax.interop.state_dict import to_reference
    from starflow_jax.parallel.mesh import make_mesh
    from starflow_jax.train.program import build_program

    steps = points[-1]
    train, heldout, order, u = _plan(config, steps)
    video = heldout.images.ndim == 5
    program = build_program(config, make_mesh(dict(config.mesh)), num_classes(config))
    state = program.init_state()
    np.savez(directory / "inputs.npz", **{k: np.asarray(v, np.float32) for k, v in to_reference(state.params).items()})
    hp = program.hp
    x_held = apply_noise(heldout.images, u, hp.noise_std, hp.noise_type, hp.levels)
    y_held = one_hot_labels(heldout.labels, hp.num_classes)

    @jax.jit
    def nll(params):
        model = nnx.merge(program.graphdef, params)
        out = model(x_held, y_held)
        return model.nll_per_frame(out) if video else nll_per_example(out.z, out.logdets)

    def device_batch(s):
        batch = dict(image=train.images[order[s]], label=train.labels[order[s]])
        return jax.device_put(batch, program.batch_shardings(batch))

    t0 = time.perf_counter()
    with jax.set_mesh(program.mesh):
        compiled = program.lower(state, device_batch(0)).compile()
    compile_s = time.perf_counter() - t0
    rows, elapsed = [_row(0, 0.0, np.asarray(nll(state.params)), config)], 0.0
    for s in range(steps):
        batch = device_batch(s)
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        if budget is not None or s + 1 in points:
            jax.block_until_ready(m)
        dt = time.perf_counter() - t0
        elapsed += dt
        done = s + 1
        over = budget is not None and elapsed >= budget
        if done in points or over or done == steps:
            rows.append(_row(done, elapsed, np.asarray(nll(state.params)), config))
        if over:
            break
    return rows, compile_s


def run_reference(path: str, config, points: list[int], budget: float | None, directory: pathlib.Path):
    import torch

    from starflow_jax.bench.reference_train import ReferenceTrainer

    steps = points[-1]
    train, heldout, order, u = _plan(config, steps)
    with np.load(directory / "inputs.npz") as f:
        sd = {k: f[k] for k in f.files}
    trainer = ReferenceTrainer(path, config, sd, num_classes(config), nearest=True)

    def heldout_nll():
        if heldout.images.ndim == 5:  # per frame, from the clips' first k frames
            frames = heldout.images.shape[1]
            return prefix_frame_nll(
                lambda k: trainer.nll(heldout.images[:, :k], u[:, :k], label=heldout.labels), frames
            )
        return trainer.nll(heldout.images, u, label=heldout.labels)

    t = config.train
    torch.manual_seed(int(t.seed))
    random.seed(int(t.seed))
    drop_p = float(t.drop_label)
    rows, elapsed = [_row(0, 0.0, heldout_nll(), config)], 0.0
    for s in range(steps):
        idx = order[s]
        t0 = time.perf_counter()
        image = train.images[idx]
        # train.py's own draws: torch.rand_like / randn_like for the noise, random.random() per label
        gen = torch.rand if str(t.noise_type) == "uniform" else torch.randn
        noise = gen(image.shape).numpy()
        drop = np.array([random.random() < drop_p for _ in idx])
        trainer.step(image, noise, label=train.labels[idx], drop=drop)
        elapsed += time.perf_counter() - t0
        done = s + 1
        over = budget is not None and elapsed >= budget
        if done in points or over or done == steps:
            rows.append(_row(done, elapsed, heldout_nll(), config))
        if over:
            break
    return rows


def plot(path: str, jax_rows: list[dict], ref_rows: list[dict], title: str) -> None:
    """Held-out bits/dim against training seconds, both curves (PIL: no plotting library)."""
    from PIL import Image, ImageDraw

    w, h, m = 720, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [(r["seconds"], r["bpd"]) for r in jax_rows + ref_rows]
    x_max = max(p[0] for p in pts) * 1.05
    y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = max((y_hi - y_lo) * 0.1, 0.01)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(sec, bpd):
        return m + (w - 2 * m) * sec / x_max, h - m - (h - 2 * m) * (bpd - y_lo) / (y_hi - y_lo)

    d.rectangle([m, m, w - m, h - m], outline="black")
    for i in range(5):
        sec, bpd = x_max * i / 4, y_lo + (y_hi - y_lo) * i / 4
        x, _ = xy(sec, y_lo)
        _, y = xy(0, bpd)
        d.text((x - 10, h - m + 8), f"{sec:.0f}", fill="black")
        d.text((8, y - 6), f"{bpd:.3f}", fill="black")
    d.text((w // 2 - 60, h - 24), "training seconds", fill="black")
    d.text((m, 20), title, fill="black")
    for rows, colour, name, k in ((jax_rows, "blue", "starflow-jax", 0), (ref_rows, "red", "reference (torch)", 1)):
        line = [xy(r["seconds"], r["bpd"]) for r in rows]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for x, y in line:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((w - m - 230, m + 10 + 16 * k), f"{name}: held-out bits/dim", fill=colour)
    img.save(path)


def run(args) -> int:
    points = parse_points(args.quality_steps)
    budget = args.budget
    if budget is not None and budget <= 0:
        raise ValueError(f"--budget is seconds of training > 0, got {budget}")
    if not args.reference and not reference_child_output():
        raise ValueError("--quality compares with the reference: give --reference PATH (apple/ml-starflow checkout)")
    config = quality_config(args.config, args.overrides, args.batch)
    if reference_child_output():
        write_json(
            reference_child_output(),
            run_reference(args.reference, config, points, budget, pathlib.Path(args.trajectory_inputs)),
        )
        return 0
    with tempfile.TemporaryDirectory() as d:
        jax_rows, compile_s = run_jax(config, points, budget, pathlib.Path(d))
        argv = ["bench", "train", "--config", str(args.config), *[a for o in args.overrides for a in ("--set", o)]]
        argv += ["--batch", str(config.train.batch_size), "--quality", "--quality-steps", args.quality_steps]
        argv += [] if budget is None else ["--budget", str(budget)]
        argv += ["--trajectory-inputs", d, "--reference", args.reference]
        ref_rows = reference_rows_in_child(argv)
    by_step = {}
    for side, rows in (("jax", jax_rows), ("ref", ref_rows)):
        for r in rows:
            by_step.setdefault(r["step"], dict(step=r["step"]))
            by_step[r["step"]].update({f"{k}_{side}": v for k, v in r.items() if k != "step"})
    table = [by_step[k] for k in sorted(by_step)]
    video = "bpd_frame1" in jax_rows[0]
    t = config.train
    length = f"budget {budget} s" if budget else f"up to {points[-1]} updates"
    print(
        f"quality: {args.config} ({' '.join(args.overrides) or 'no overrides'}), batch {t.batch_size}, lr {t.lr}, "
        f"{t.steps} schedule steps, {length}; "
        f"held-out bits/dim and training seconds (the JAX step's compilation, not counted: {compile_s:.1f} s)"
    )
    _, ours_only = without_ours_only(model_config(config))
    if ours_only:
        print(
            f"the reference lacks {', '.join('model.' + k for k in ours_only)}: it trains its nearest model, "
            "the same parameters with its own positions (the options off)"
        )
    print_table(table, VIDEO_COLUMNS if video else COLUMNS)
    if args.plot:
        plot(args.plot, jax_rows, ref_rows, f"{pathlib.Path(args.config).name}: held-out bits/dim vs training time")
        print(f"plot: {args.plot}")
    write_json(
        args.json,
        dict(
            config=str(args.config),
            overrides=list(args.overrides),
            compile_seconds=compile_s,
            reference_without=[f"model.{k}" for k in ours_only],
            rows=table,
            jax=jax_rows,
            reference=ref_rows,
        ),
    )
    return 0
