"""The pod recipes (configs/starflow_3b_t2i_256.py, configs/starflow_v_7b_t2v_480p.py) and
what the 7B one needs: aspect-ratio buckets and joint image + video batches
(data.mixture), decided from (seed, step) so that a resumed run draws the same batches;
their tiny twins trained a few steps on CPU from shards precomputed here."""

import json
import pathlib

import numpy as np
import pytest

from starflow_jax.cli.main import main
from starflow_jax.config import check_training_config, load_config
from starflow_jax.data.buckets import ASPECT_RATIOS, bucket_dir, bucket_size, ratio_of_dir
from starflow_jax.data.mixture import PRIMARY, SECONDARY, MixtureBatches, bucket_decision, secondary_decision
from starflow_jax.data.pipeline import ArraySource

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ------------------------------------------------------------------ the decisions
def test_secondary_decision_is_a_function_of_seed_and_step_with_the_ratio():
    draws = [secondary_decision(3, s, 0.2) for s in range(20_000)]
    assert draws == [secondary_decision(3, s, 0.2) for s in range(20_000)]
    assert abs(np.mean(draws) - 0.2) < 0.01
    assert draws != [secondary_decision(4, s, 0.2) for s in range(20_000)]
    assert not any(secondary_decision(3, s, 0.0) for s in range(100))
    assert all(secondary_decision(3, s, 1.0) for s in range(100))


def test_bucket_decision_follows_the_bucket_sizes():
    sizes = [100, 300, 600]
    picks = np.array([bucket_decision(7, s, sizes) for s in range(30_000)])
    assert np.allclose(np.bincount(picks, minlength=3) / len(picks), [0.1, 0.3, 0.6], atol=0.015)
    assert bucket_decision(7, 5, sizes) == bucket_decision(7, 5, sizes)
    other = [bucket_decision(7, s, sizes, SECONDARY) for s in range(200)]
    assert other != picks[:200].tolist()  # the secondary data draws its buckets apart
    assert bucket_decision(7, 5, [9]) == 0
    with pytest.raises(ValueError, match="positive counts"):
        bucket_decision(7, 5, [3, 0])


def _mixture(**kw):
    def src(n, shape, offset):
        return ArraySource(image=np.arange(n * np.prod(shape), dtype=np.float32).reshape((n,) + shape) + offset)

    groups = {
        PRIMARY: {"1:1": src(10, (2, 1, 4, 4), 0), "16:9": src(6, (2, 1, 3, 5), 1e4)},
        SECONDARY: {"1:1": src(12, (1, 4, 4), 2e4)},
    }
    return MixtureBatches(groups, {PRIMARY: 2, SECONDARY: 4}, seed=1, secondary_ratio=0.3, **kw)


def test_mixture_batches_have_one_shape_and_resume_exactly():
    it = _mixture()
    seen = []
    for _ in range(40):
        b = next(it)
        g, bucket = it.last
        shape = {
            (PRIMARY, "1:1"): (2, 2, 1, 4, 4),
            (PRIMARY, "16:9"): (2, 2, 1, 3, 5),
            (SECONDARY, "1:1"): (4, 1, 4, 4),
        }[g, bucket]
        assert b["image"].shape == shape
        seen.append((g, bucket))
    assert set(seen) == {(PRIMARY, "1:1"), (PRIMARY, "16:9"), (SECONDARY, "1:1")}
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    ahead = [next(it)["image"] for _ in range(10)]
    again = _mixture()
    again.set_state(state)
    assert all(np.array_equal(a, next(again)["image"]) for a in ahead)
    # processes read disjoint rows of the same global batch
    halves = [_mixture(process_index=i, process_count=2) for i in range(2)]
    whole = _mixture()
    for _ in range(6):
        rows = np.concatenate([next(h)["image"] for h in halves])
        assert np.array_equal(rows, next(whole)["image"])
    with pytest.raises(ValueError, match="buckets"):
        again.set_state({"step": 1, "counts": {"primary/1:1": 1}})
    # read ahead by threads or on demand: the same batches
    eager, lazy = _mixture(prefetch=3), _mixture(prefetch=0)
    assert all(np.array_equal(next(eager)["image"], next(lazy)["image"]) for _ in range(12))


def test_bucket_sizes_follow_the_reference_rule():
    assert bucket_size(640, "1:1", 16) == (640, 640)
    assert bucket_size(640, "16:9", 16) == (480, 848)  # round(640 / sqrt(16/9) / 16) * 16, round(640 * 4/3 / 16) * 16
    assert bucket_size(256, "21:9", 8) == (168, 392)
    assert [ratio_of_dir(bucket_dir(r)) for r in ASPECT_RATIOS] == list(ASPECT_RATIOS)
    with pytest.raises(ValueError, match="not a bucket"):
        bucket_size(256, "7:5", 8)
    with pytest.raises(ValueError, match="not an aspect-ratio bucket"):
        ratio_of_dir("misc")


# ------------------------------------------------------------------ the pod configs
@pytest.mark.parametrize("name", ["starflow_3b_t2i_256", "starflow_v_7b_t2v_480p"])
def test_pod_configs_are_training_configs(name, tmp_path, capsys):
    config = load_config(CONFIGS / f"{name}.py")
    check_training_config(config)
    assert main(["train", "--config", str(CONFIGS / f"{name}.py"), "--workdir", str(tmp_path / "wd")]) == 2
    assert "needs data.path" in capsys.readouterr().err
    assert not (tmp_path / "wd").exists()


def test_pod_recipe_values():
    t3 = load_config(CONFIGS / "starflow_3b_t2i_256.py").train
    assert (t3.batch_size, t3.lr, t3.min_lr, t3.latent_norm_regularization, t3.grad_clip) == (
        1024,
        6.4e-5,
        1e-6,
        1e-4,
        0.0,
    )
    c7 = load_config(CONFIGS / "starflow_v_7b_t2v_480p.py")
    t7 = c7.train
    assert (t7.batch_size, t7.secondary_batch_size, t7.secondary_ratio, t7.drop_image, t7.remat) == (
        192,
        1536,
        0.2,
        0.25,
        "full",
    )
    assert c7.data.mix_aspect and t7.cond_noise_level and t7.grad_skip
    from starflow_jax.data.sources import latent_frames

    assert latent_frames(c7) == 21  # 81 frames through the Wan VAE's temporal factor 4


@pytest.mark.parametrize("name,chips", [("starflow_3b_t2i_256", 64), ("starflow_v_7b_t2v_480p", 128)])
def test_pod_meshes_split_every_batch(name, chips):
    """v5p-128 (64 chips) for 3B, v5p-256 (128 chips) for 7B: FSDP over every chip, and each
    kind of batch divides over the mesh's data x fsdp."""
    from starflow_jax.data.mixture import batch_sizes
    from starflow_jax.parallel.mesh import mesh_shape

    config = load_config(CONFIGS / f"{name}.py")
    data, fsdp, tensor = mesh_shape(dict(config.mesh), chips)
    assert data == 1 and fsdp * tensor == chips
    sizes = batch_sizes(config)
    assert all(b % (data * fsdp) == 0 for b in sizes.values()), (sizes, data * fsdp)


# ------------------------------------------------------------------ tiny twins, trained
TXT = (16, 2048)


def _text_encoder(texts):
    """Prompts to (b, 16, 2048) embeddings that depend on every character."""
    out = np.zeros((len(texts),) + TXT, np.float32)
    for k, t in enumerate(texts):
        codes = np.frombuffer(t.encode(), np.uint8).astype(np.float32)
        out[k] = (np.resize(np.cumsum(codes) % 97, TXT[0] * 8).reshape(TXT[0], 8) / 97).repeat(TXT[1] // 8, 1)
    return out


def _pool_vae(factor, channels):
    """A fake VAE: ``factor`` x ``factor`` average pooling and a fixed 3 -> ``channels`` projection."""
    proj = np.random.default_rng(0).normal(size=(channels, 3)).astype(np.float32)

    def encode(images):
        b, c, h, w = images.shape
        pooled = images.reshape(b, c, h // factor, factor, w // factor, factor).mean((3, 5))
        return np.einsum("oc,bchw->bohw", proj, pooled)

    return encode


def _images(root, n, seed=0):
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        h, w = rng.integers(48, 96, 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png\ta picture number {i}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


def _rows(workdir):
    return {r["step"]: r for r in map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_tiny_3b_trains_three_steps_on_precomputed_shards(tmp_path):
    from starflow_jax.data.precompute import precompute, read_captions
    from starflow_jax.train.loop import train

    imgs = _images(tmp_path / "imgs", 8)
    precompute(
        read_captions(imgs, imgs / "captions.tsv"),
        tmp_path / "shards",
        encode_images=_pool_vae(8, 4),
        encode_texts=_text_encoder,
        image_size=64,
        log=lambda *a: None,
    )
    config = load_config(
        CONFIGS / "starflow_3b_t2i_256_tiny.py",
        [f"data.path={tmp_path / 'shards'}", "train.steps=3", "train.log_every=1"],
    )
    result = train(config, str(tmp_path / "wd"), log=lambda *a: None)
    rows = _rows(tmp_path / "wd")
    assert result["steps"] == 3 and sorted(rows) == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows.values())


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """Clip buckets 1:1 and 16:9 (3 latent frames of 48 channels, 4x4 and 3x5) and image
    buckets 1:1 and 16:9 (4x4, 3x5), precomputed with the 7B recipe's templates."""
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("av")
    from starflow_jax.data.buckets import bucket_dir
    from starflow_jax.data.precompute import precompute, precompute_videos, read_captions, temporal_video_encoder
    from starflow_jax.data.video import VideoFolderSource

    root = tmp_path_factory.mktemp("pod")
    clips = root / "clips"
    clips.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        iio.imwrite(
            clips / f"{i}.mp4",
            rng.integers(0, 255, (12, 64, 96, 3), dtype=np.uint8),
            plugin="pyav",
            codec="libx264",
            fps=10,
        )
        (clips / f"{i}.txt").write_text(f"clip number {i}")
    imgs = _images(root / "imgs", 6)
    vae = _pool_vae(16, 48)

    def encode_clip(x):  # (b, 9, 3, h, w) -> (b, 3, 48, h/16, w/16): a causal 4x temporal factor
        b, t = x.shape[:2]
        return vae(x[:, ::4].reshape((-1,) + x.shape[2:])).reshape((b, 3, 48) + tuple(np.array(x.shape[3:]) // 16))

    for ratio in ("1:1", "16:9"):
        size = bucket_size(64, ratio, 16)
        templates = dict(aspect_ratio=ratio, noise_std=0.5)
        precompute_videos(
            VideoFolderSource(clips, 9, size),
            root / "clips_shards" / bucket_dir(ratio),
            encode_video=temporal_video_encoder(encode_clip),
            encode_texts=_text_encoder,
            fps_cond=True,
            extend=True,
            templates=templates,
            log=lambda *a: None,
        )
        precompute(
            read_captions(imgs, imgs / "captions.tsv"),
            root / "image_shards" / bucket_dir(ratio),
            encode_images=vae,
            encode_texts=_text_encoder,
            image_size=size,
            templates=dict(templates, fps=0),
            log=lambda *a: None,
        )
    return root


def _tiny_7b(shards, seed, *extra):
    return load_config(
        CONFIGS / "starflow_v_7b_t2v_480p_tiny.py",
        [
            f"data.path={shards / 'clips_shards'}",
            f"data.secondary_path={shards / 'image_shards'}",
            "train.steps=3",
            "train.log_every=1",
            "train.checkpoint_every=1",
            f"train.seed={seed}",
            "train.secondary_ratio=0.4",
            *extra,
        ],
    )


def test_precomputed_buckets_have_their_shapes_and_templates(video_shards):
    from starflow_jax.data.array_record import ArrayRecordSource
    from starflow_jax.text.prompts import prepare_prompts

    clip = ArrayRecordSource(video_shards / "clips_shards" / "16x9")[0]
    img = ArrayRecordSource(video_shards / "image_shards" / "16x9")[0]
    assert clip["latent"].shape == (3, 48, 3, 5) and img["latent"].shape == (48, 3, 5)
    assert tuple(img["size"]) == (48, 80)
    want = prepare_prompts([str(img["caption"])], fps=0, noise_std=0.5, aspect_ratio="16:9")
    assert want[0].startswith("Noise Level 500:\nAn image:\n") and want[0].endswith("in a 16:9 aspect ratio.\n")
    assert np.array_equal(img["text_emb"], _text_encoder(want)[0])


@pytest.mark.slow
def test_tiny_7b_trains_on_buckets_and_images_and_resumes_the_same(video_shards, tmp_path, monkeypatch):
    from starflow_jax.data.mixture import train_batches
    from starflow_jax.data.sources import make_data
    from starflow_jax.train import loop

    def plan(seed):
        it = train_batches(make_data(_tiny_7b(video_shards, seed)), _tiny_7b(video_shards, seed))
        return [it.choose(s) for s in range(3)]

    # a seed whose 3 steps meet image and clip batches and both buckets
    seed = next(s for s in range(200) if len({g for g, _ in plan(s)}) == 2 and len({b for _, b in plan(s)}) == 2)
    shapes = []

    class Recorded:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            batch = next(self.it)
            shapes.append(tuple(batch["image"].shape))
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    monkeypatch.setattr(loop, "train_batches", lambda data, config: Recorded(train_batches(data, config)))
    quiet = dict(log=lambda *a: None)
    loop.train(_tiny_7b(video_shards, seed), str(tmp_path / "a"), **quiet)
    assert len({len(s) for s in shapes}) == 2 and len({s[-2:] for s in shapes}) == 2  # images and clips, 2 buckets
    first = list(shapes)
    shapes.clear()
    loop.train(_tiny_7b(video_shards, seed), str(tmp_path / "b"), stop_after=2, **quiet)
    loop.train(_tiny_7b(video_shards, seed), str(tmp_path / "b"), **quiet)
    assert shapes == first
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a[3]["loss"] == b[3]["loss"] and np.isfinite(a[3]["loss"])


def _shards(path, latent_shape, n=2):
    from starflow_jax.data.array_record import write_shards

    write_shards(
        path, ({"latent": np.zeros(latent_shape, np.float32), "text_emb": np.zeros(TXT, np.float32)} for _ in range(n))
    )
    return path


def test_bucket_and_secondary_layouts_are_checked(tmp_path):
    from starflow_jax.data.sources import make_data

    flat = _shards(tmp_path / "flat", (3, 48, 4, 4))
    _shards(tmp_path / "buckets" / "16x9", (3, 48, 3, 5))
    _shards(tmp_path / "images" / "16x9", (48, 3, 5))
    _shards(tmp_path / "odd" / "misc", (3, 48, 4, 4))

    def data(path, secondary="", ratio=0.0, mix=True):
        return make_data(
            load_config(
                CONFIGS / "starflow_v_7b_t2v_480p_tiny.py",
                [
                    f"data.path={path}",
                    f"data.secondary_path={secondary}",
                    f"train.secondary_ratio={ratio}",
                    f"data.mix_aspect={mix}",
                    "train.drop_image=0",
                ],
            )
        )

    spec = data(tmp_path / "buckets", tmp_path / "images", 0.2)
    assert sorted(spec.train_buckets) == ["16:9"] and sorted(spec.secondary_buckets) == ["16:9"]
    with pytest.raises(ValueError, match="holds shards, data.mix_aspect=True wants one folder per aspect-ratio"):
        data(flat)
    with pytest.raises(ValueError, match="holds no shards but folders .* set data.mix_aspect=True"):
        data(tmp_path / "buckets", mix=False)
    with pytest.raises(ValueError, match="'misc' is not an aspect-ratio bucket"):
        data(tmp_path / "odd")
    with pytest.raises(ValueError, match="joint image \\+ video training needs both"):
        data(tmp_path / "buckets", ratio=0.2)
    with pytest.raises(ValueError, match="joint image \\+ video training needs both"):
        data(tmp_path / "buckets", tmp_path / "images")
    with pytest.raises(ValueError, match="data.secondary_path must hold images"):
        data(tmp_path / "buckets", tmp_path / "buckets", 0.2)
    wrong = _shards(tmp_path / "wrong" / "1x1", (3, 4, 4, 4))
    with pytest.raises(
        ValueError,
        match=r"latents in .*1x1 have shape \(3, 4, 4, 4\), the model expects images "
        r"\(48, h, w\) or video clips \(frames, 48, h, w\) \(h, w multiples of 1\)$",
    ):
        data(wrong.parent)
    with pytest.raises(ValueError, match="needs text_emb_extend"):  # the recipe's drop_image reads it from the clips
        make_data(
            load_config(
                CONFIGS / "starflow_v_7b_t2v_480p_tiny.py",
                [f"data.path={tmp_path / 'buckets'}", f"data.secondary_path={tmp_path / 'images'}"],
            )
        )


def test_secondary_batch_must_split_over_the_mesh():
    import types

    from starflow_jax.data.mixture import check_secondary_split

    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 1})
    config = load_config(CONFIGS / "starflow_v_7b_t2v_480p_tiny.py", ["data.secondary_path=x"])
    check_secondary_split(config, mesh)  # 8 images over 8
    config.train.secondary_batch_size = 12
    with pytest.raises(ValueError, match=r"secondary_batch_size=12 is not divisible by the mesh's data x fsdp = 8"):
        check_secondary_split(config, mesh)
    config.train.secondary_batch_size = 0  # 0: train.batch_size (4), which does not split over 8 either
    with pytest.raises(ValueError, match=r"train.secondary_batch_size=4 is not divisible"):
        check_secondary_split(config, mesh)
