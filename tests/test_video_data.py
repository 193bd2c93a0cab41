"""Video data for STARFlow-V: clip frame indices (the reference's sample_clip rule),
decoding clips with imageio/PyAV, a folder of captioned videos as a grain source, video
precompute into ArrayRecord shards (latents (t, c, h, w), text_emb_extend), and training
on video latents with drop_image."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

iio = pytest.importorskip("imageio.v3")
av = pytest.importorskip("av")

from starflow_jax.data.array_record import ArrayRecordSource, write_shards  # noqa: E402
from starflow_jax.data.pipeline import drop_first_frame, drop_image_decision  # noqa: E402
from starflow_jax.data.precompute import (
    framewise_video_encoder,
    precompute_videos,  # noqa: E402
    temporal_video_encoder,
)
from starflow_jax.data.video import VideoFolderSource, clip_indices, read_clip, video_info  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPTION = "a white square moving right"


def _square_frames(n, h=32, w=48):
    """``n`` frames of an 8x8 white square on black whose left edge is at x = 2i in frame i."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, 12:20, 2 * i : 2 * i + 8] = 255
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """clips/a.mp4 (20 frames, 10 fps, H.264: the container gives its frame count) and
    clips/sub/b.webm (12 frames, 10 fps, VP8: it does not), each with a sidecar caption."""
    root = tmp_path_factory.mktemp("videos") / "clips"
    (root / "sub").mkdir(parents=True)
    iio.imwrite(root / "a.mp4", _square_frames(20), plugin="pyav", codec="libx264", fps=10)
    (root / "a.txt").write_text(CAPTION + "\n")
    iio.imwrite(root / "sub" / "b.webm", _square_frames(12), plugin="pyav", codec="libvpx", fps=10)
    (root / "sub" / "b.txt").write_text("a short clip")
    return root


def test_video_info(clips):
    assert video_info(clips / "a.mp4") == (20, 10.0)
    assert video_info(clips / "sub" / "b.webm") == (12, 10.0)  # counted by decoding


def test_read_clip_decodes_frames_in_order(clips):
    full = read_clip(clips / "a.mp4", range(20), (32, 48))
    assert full.shape == (20, 3, 32, 48) and full.dtype == np.float32
    assert full.min() >= -1 and full.max() <= 1
    centre_x = [np.nonzero(full[i].mean(0) > 0)[1].mean() for i in range(20)]
    np.testing.assert_allclose(centre_x, 2 * np.arange(20) + 3.5, atol=0.6)  # the square moves 2 px a frame
    np.testing.assert_array_equal(read_clip(clips / "a.mp4", [5, 2, 5], (32, 48)), full[[5, 2, 5]])
    small = read_clip(clips / "a.mp4", [0], 16)  # 32x48 -> 16x24 (bicubic) -> centre 16x16
    assert small.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="has 20 frames, frame 25 was asked for"):
        read_clip(clips / "a.mp4", [0, 25], 16)


def test_clip_indices_hand_computed():
    # 10 fps source, 5 fps clip of 5 frames: every 2nd frame; start 0 .. floor(20 - 8 - 1) = 11
    starts = set()
    for seed in range(300):
        idx = clip_indices(20, 10.0, 5, 5.0, np.random.default_rng(seed))
        np.testing.assert_array_equal(idx - idx[0], [0, 2, 4, 6, 8])
        starts.add(int(idx[0]))
    assert starts == set(range(12))
    # 30 fps source, 12 fps clip: step 2.5, rounded half to even from the start
    seen = {}
    for seed in range(200):
        idx = clip_indices(100, 30.0, 5, 12.0, seed)
        assert 0 <= idx[0] <= 89
        seen[int(idx[0])] = idx.tolist()
    assert seen[0] == [0, 2, 5, 8, 10] and seen[1] == [1, 4, 6, 8, 11]
    # out_fps >= src_fps or None: consecutive frames, start 0 .. 20 - 7 - 1 = 12
    for out in (None, 10.0, 25.0):
        got = {tuple(clip_indices(20, 10.0, 8, out, s)) for s in range(200)}
        assert got == {tuple(range(s, s + 8)) for s in range(13)}
    # too short: evenly spread over the whole video (frames repeat)
    np.testing.assert_array_equal(clip_indices(6, 10.0, 8, None, 0), [0, 0, 1, 2, 2, 3, 4, 5])
    np.testing.assert_array_equal(clip_indices(8, 10.0, 8, None, 0), np.arange(8))  # room exactly 1
    np.testing.assert_array_equal(clip_indices(9, 10.0, 5, 5.0, 0), [0, 2, 4, 6, 8])
    assert {int(clip_indices(10, 10.0, 5, 5.0, s)[0]) for s in range(50)} == {0, 1}
    assert clip_indices(1, 10.0, 3, None, 0).tolist() == [0, 0, 0]
    # deterministic for a generator state
    assert clip_indices(50, 10, 4, 5, 7).tolist() == clip_indices(50, 10, 4, 5, 7).tolist()
    for bad, msg in [
        ((0, 10.0, 4, None), "at least 1 frame"),
        ((10, 10.0, 0, None), "num_frames must be >= 1"),
        ((10, 0.0, 4, None), "source frame rate"),
        ((10, 10.0, 4, -1.0), "out_fps must be positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            clip_indices(*bad, 0)


def test_video_folder_source(clips):
    src = VideoFolderSource(clips, num_frames=4, size=16, fps=5, seed=3)
    assert len(src) == 2
    rec = src[0]
    assert rec["video"].shape == (4, 3, 16, 16) and rec["video"].dtype == np.float32
    assert -1 <= rec["video"].min() and rec["video"].max() <= 1
    assert rec["caption"] == CAPTION and rec["fps"] == 5.0
    assert src[1]["caption"] == "a short clip" and src[1]["video"].shape == (4, 3, 16, 16)
    idx = src.clip(0)
    np.testing.assert_array_equal(idx - idx[0], [0, 2, 4, 6])  # 10 fps read at 5 fps
    again = VideoFolderSource(clips, num_frames=4, size=16, fps=5, seed=3)
    np.testing.assert_array_equal(again[0]["video"], rec["video"])  # the same clip for a (seed, index)
    np.testing.assert_array_equal(src[0]["video"], rec["video"])
    assert len({int(VideoFolderSource(clips, 4, 16, fps=5, seed=s).clip(0)[0]) for s in range(8)}) > 1
    native = VideoFolderSource(clips, num_frames=3, size=(16, 24), seed=0)
    r = native[0]
    assert r["fps"] == 10.0 and r["video"].shape == (3, 3, 16, 24)
    np.testing.assert_array_equal(np.diff(native.clip(0)), [1, 1])
    # the clip really is those frames of the video, in order
    np.testing.assert_array_equal(r["video"], read_clip(clips / "a.mp4", native.clip(0), (16, 24)))


def test_video_folder_source_captions_file(clips, tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sub/b.webm\tcaption from the file\n")
    src = VideoFolderSource(clips, 2, 8, captions_file=tsv)
    assert len(src) == 1 and src[0]["caption"] == "caption from the file"
    tsv.write_text("a.txt\tnot a video\n")
    with pytest.raises(ValueError, match="a.txt is not a video file"):
        VideoFolderSource(clips, 2, 8, captions_file=tsv)


def test_video_folder_source_errors(clips, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no videos"):
        VideoFolderSource(tmp_path / "empty", 4, 16)
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolderSource(tmp_path / "nowhere", 4, 16)
    for nf, size, msg in [
        (0, 16, "num_frames must be a positive integer"),
        (2.5, 16, "num_frames"),
        (4, 0, "size must be positive"),
        (4, "big", "size must be an int or"),
        (4, (16, -2), "size must be positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            VideoFolderSource(clips, nf, size)
    with pytest.raises(ValueError, match="fps must be positive"):
        VideoFolderSource(clips, 4, 16, fps=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.mp4").write_bytes((clips / "a.mp4").read_bytes())
    with pytest.raises(ValueError, match="videos without a caption: ok.mp4"):
        VideoFolderSource(bad, 4, 16)
    (bad / "ok.txt").write_text("fine")
    (bad / "x.mp4").write_bytes(b"this is not a video" * 20)
    (bad / "x.txt").write_text("broken")
    c = av.open(str(bad / "y.avi"), "w")  # a container without a single frame
    s = c.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    c.start_encoding()
    c.close()
    (bad / "y.txt").write_text("empty")
    src = VideoFolderSource(bad, 4, 16)
    assert src[0]["video"].shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"cannot read video file .*x\.mp4"):
        src[1]
    with pytest.raises(ValueError, match=r"y\.avi has no frames"):
        src[2]
    with pytest.raises(IndexError):
        src[3]


def _fake_text_encoder(seen):
    """Prompts to (b, 6, 8) embeddings that depend on every character; records the prompts."""

    def encode(texts):
        seen.extend(texts)
        out = np.zeros((len(texts), 6, 8), np.float32)
        for k, t in enumerate(texts):
            codes = np.frombuffer(t.encode(), np.uint8).astype(np.float32)
            out[k] = np.resize(np.cumsum(codes) % 97, 48).reshape(6, 8) / 97
        return out

    return encode


def _pool_encoder(images):
    """A tiny random 'VAE': 2x2 average pooling and a fixed 3 -> 4 channel projection."""
    b, c, h, w = images.shape
    pooled = images.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))
    proj = np.random.default_rng(0).normal(size=(4, c)).astype(np.float32)
    return np.einsum("oc,bchw->bohw", proj, pooled)


def test_precompute_videos(clips, tmp_path):
    from starflow_jax.text.prompts import prepare_prompts

    src = VideoFolderSource(clips, num_frames=4, size=16, fps=5, seed=1)
    seen = []
    calls = []

    def images(x):
        calls.append(x.shape[0])
        return _pool_encoder(x)

    shards = precompute_videos(
        src,
        tmp_path / "shards",
        encode_video=framewise_video_encoder(images, 3),
        encode_texts=_fake_text_encoder(seen),
        fps_cond=True,
        extend=True,
        batch_size=2,
        records_per_shard=1,
        log=lambda *a: None,
    )
    assert len(shards) == 2 and calls == [3, 1, 3, 1]  # frame by frame, 3 frames per encoder call
    out = ArrayRecordSource(tmp_path / "shards")
    rec = out[0]
    assert rec["latent"].shape == (4, 4, 8, 8)  # (t, c, h / 2, w / 2)
    np.testing.assert_allclose(rec["latent"], _pool_encoder(src[0]["video"]), rtol=1e-6, atol=1e-6)
    assert str(rec["caption"]) == CAPTION and float(rec["fps"]) == 5.0
    assert int(rec["num_frames"]) == 4 and rec["size"].tolist() == [16, 16]
    # one record per shard: each shard embeds its caption, then the "(extend) " one, through the fps template
    assert seen == [
        *prepare_prompts([CAPTION], fps=5),
        "A video with 5 fps:\n(extend) " + CAPTION + "\n",
        *prepare_prompts(["a short clip"], fps=5),
        "A video with 5 fps:\n(extend) a short clip\n",
    ]
    enc = _fake_text_encoder([])
    np.testing.assert_array_equal(rec["text_emb"], enc(seen[:1])[0])
    np.testing.assert_array_equal(rec["text_emb_extend"], enc(seen[1:2])[0])
    assert not np.array_equal(rec["text_emb"], rec["text_emb_extend"])
    assert json.loads((tmp_path / "shards" / "index.json").read_text())["num_records"] == 2
    # a temporal video encoder (b, t, c, h, w) -> (b, t', c', h', w') plugs in as one function
    seen.clear()
    precompute_videos(
        src,
        tmp_path / "t",
        encode_video=temporal_video_encoder(lambda x: x[:, ::2, :, ::4, ::4]),
        encode_texts=_fake_text_encoder(seen),
        log=lambda *a: None,
    )
    rec = ArrayRecordSource(tmp_path / "t")[1]
    assert rec["latent"].shape == (2, 3, 4, 4) and "text_emb_extend" not in rec
    assert seen == [CAPTION, "a short clip"]  # no fps template without fps_cond
    with pytest.raises(ValueError, match="other settings"):  # resuming needs the same settings
        precompute_videos(
            src,
            tmp_path / "t",
            encode_video=temporal_video_encoder(lambda x: x),
            encode_texts=_fake_text_encoder([]),
            extend=True,
            log=lambda *a: None,
        )
    with pytest.raises(ValueError, match="expected \\(t', c', h', w'\\)"):
        precompute_videos(
            src, tmp_path / "u", encode_video=lambda v: v[0], encode_texts=_fake_text_encoder([]), log=lambda *a: None
        )


def test_drop_image_decision_and_batch():
    a = [drop_image_decision(0, s, 0.3) for s in range(400)]
    assert a == [drop_image_decision(0, s, 0.3) for s in range(400)]  # a resumed run decides the same
    assert a != [drop_image_decision(1, s, 0.3) for s in range(400)]
    assert 0.22 < np.mean(a) < 0.38
    assert not any(drop_image_decision(0, s, 0.0) for s in range(50))
    assert all(drop_image_decision(0, s, 1.0) for s in range(50))
    rng = np.random.default_rng(0)
    batch = dict(image=rng.normal(size=(2, 5, 4, 8, 8)), cond=np.zeros((2, 3, 6)), cond_extend=np.ones((2, 3, 6)))
    kept = drop_first_frame(batch, False)
    assert set(kept) == {"image", "cond"} and kept["image"] is batch["image"] and not kept["cond"].any()
    dropped = drop_first_frame(batch, True)
    np.testing.assert_array_equal(dropped["image"], batch["image"][:, 1:])
    assert dropped["cond"].all() and "cond_extend" not in dropped and "cond_extend" in batch
    with pytest.raises(ValueError, match="text_emb_extend"):
        drop_first_frame(dict(image=batch["image"], cond=batch["cond"]), True)
    with pytest.raises(ValueError, match="video latents"):
        drop_first_frame(dict(image=np.zeros((2, 4, 8, 8)), cond=batch["cond"], cond_extend=batch["cond"]), True)


def _video_shards(path, n=8, t=3, extend=True):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        r = dict(
            latent=rng.normal(size=(t, 4, 8, 8)).astype(np.float32),
            text_emb=rng.normal(size=(3, 32)).astype(np.float32),
            caption=f"clip {i}",
            fps=np.float32(8),
        )
        if extend:
            r["text_emb_extend"] = rng.normal(size=(3, 32)).astype(np.float32)
        recs.append(r)
    write_shards(path, recs, records_per_shard=4)


def _video_config(path, overrides=()):
    from starflow_jax.config import load_config

    config = load_config(
        ROOT / "configs" / "t2v_latents_tiny.py",
        [
            f"data.path={path}",
            "data.num_frames=3",
            "model.txt_size=3",
            "model.txt_dim=32",
            "model.channels=32",
            "model.layers_per_block=[1, 0, 1]",
            "train.steps=4",
            "train.batch_size=2",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.eval_every=0",
            "train.checkpoint_every=2",
            "sample.num=1",
            "sample.scale=1",
            "train.drop_image=0",
            *overrides,
        ],
    )
    return config


def test_array_record_video_latents_are_checked(tmp_path):
    from starflow_jax.data.sources import latent_frames, make_data

    _video_shards(tmp_path / "v")
    _video_shards(tmp_path / "plain", extend=False)
    data = make_data(_video_config(tmp_path / "v", ["train.drop_image=0.5"]))
    assert data.train[0]["image"].shape == (3, 4, 8, 8) and data.train[0]["cond_extend"].shape == (3, 32)
    assert set(make_data(_video_config(tmp_path / "plain")).train[0]) == {"image", "cond"}
    with pytest.raises(ValueError, match="have 3 frames, the config asks for 5"):
        make_data(_video_config(tmp_path / "v", ["data.num_frames=5"]))
    with pytest.raises(ValueError, match="needs text_emb_extend"):
        make_data(_video_config(tmp_path / "plain", ["train.drop_image=0.25"]))
    with pytest.raises(ValueError, match="probability in \\[0, 1\\]"):
        make_data(_video_config(tmp_path / "v", ["train.drop_image=1.5"]))
    with pytest.raises(ValueError, match="train them with a video model"):
        make_data(_video_config(tmp_path / "v", ["model.temporal_causal=0", "model.shallow_block_local=false"]))
    with pytest.raises(ValueError, match=r"have shape \(3, 4, 8, 8\), the model expects images \(3, 8, 8\) or video"):
        make_data(_video_config(tmp_path / "v", ["model.in_channels=3"]))
    write_shards(
        tmp_path / "img", [dict(latent=np.zeros((4, 8, 8), np.float32), text_emb=np.zeros((3, 32), np.float32))] * 2
    )
    with pytest.raises(ValueError, match="are images .* clips of 3 frames"):
        make_data(_video_config(tmp_path / "img"))
    from starflow_jax.config import data_section

    cfg = ml_collections.ConfigDict(
        dict(data=data_section(vid_size="81:16"), autoencoder=dict(temporal_downsample_factor=4))
    )
    assert latent_frames(cfg) == 21
    assert latent_frames(ml_collections.ConfigDict(dict(data=data_section(vid_size="16:8")))) == 16


def test_train_on_video_latents_with_drop_image(tmp_path, monkeypatch):
    """drop_image=0.5, seed 2: step 0 keeps the first frame, step 1 drops it (conditioned on
    text_emb_extend). The run is stopped after step 0 and resumed: the resumed run decides
    step 1 as an uninterrupted one would (from the seed and the step, not from the restart)."""
    from starflow_jax.train import loop

    assert [drop_image_decision(2, s, 0.5) for s in range(2)] == [False, True]
    seen = []

    def spy(batch, drop):
        out = drop_first_frame(batch, drop)
        extend = np.array_equal(out["cond"], batch["cond_extend"]) and not np.array_equal(out["cond"], batch["cond"])
        seen.append((drop, out["image"].shape, extend))
        return out

    monkeypatch.setattr(loop, "drop_first_frame", spy)
    _video_shards(tmp_path / "v")
    config = _video_config(tmp_path / "v", ["train.drop_image=0.5", "train.seed=2", "train.steps=2"])
    assert loop.train(config, str(tmp_path / "run"), log=lambda *a: None, stop_after=1)["stopped"]
    assert seen == [(False, (2, 3, 4, 8, 8), False)]
    result = loop.train(config, str(tmp_path / "run"), log=lambda *a: None)  # resumes at step 1
    assert result["steps"] == 2 and seen[1:] == [(True, (2, 2, 4, 8, 8), True)]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert (tmp_path / "run" / "samples.png").exists()  # a row of 3 sampled frames


def test_precompute_cli_videos(clips, tmp_path, capsys):
    """`starflow-jax precompute --videos` through a tiny random diffusers VAE (frame by frame)
    and T5: latents (t, c, h / 2, w / 2), text_emb with the fps template, text_emb_extend."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("sentencepiece")
    from conftest import make_t5_tokenizer

    from starflow_jax.autoencoders import encode_latents, vae_from_diffusers
    from starflow_jax.cli.main import main
    from starflow_jax.text import encode_prompts, load_tokenizer, t5_from_transformers

    tok_dir = make_t5_tokenizer(tmp_path)
    torch.manual_seed(0)
    transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=200, d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32, feed_forward_proj="gated-gelu"
        )
    ).save_pretrained(str(tok_dir))
    diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=16,
    ).save_pretrained(str(tmp_path / "vae"))
    args = [
        "precompute",
        "--videos",
        str(clips),
        "--vae",
        str(tmp_path / "vae"),
        "--text-encoder",
        str(tok_dir),
        "--out",
        str(tmp_path / "shards"),
        "--image-size",
        "16",
        "--txt-size",
        "6",
        "--num-frames",
        "3",
        "--fps",
        "5",
        "--fps-cond",
        "--drop-image",
        "--batch-size",
        "3",
        "--seed",
        "4",
    ]
    assert main(args) == 0
    assert "latents (3, 4, 8, 8)" in capsys.readouterr().out
    rec = ArrayRecordSource(tmp_path / "shards")[0]
    assert rec["latent"].shape == (3, 4, 8, 8) and float(rec["fps"]) == 5.0
    clip = VideoFolderSource(clips, 3, 16, fps=5, seed=4)[0]["video"]
    want = np.asarray(encode_latents(vae_from_diffusers(str(tmp_path / "vae")), clip))
    np.testing.assert_allclose(rec["latent"], want, rtol=1e-5, atol=1e-5)
    enc, tok = t5_from_transformers(str(tok_dir)), load_tokenizer(tok_dir)
    np.testing.assert_allclose(
        rec["text_emb"], np.asarray(encode_prompts(enc, tok, [CAPTION], 6, fps=5))[0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        rec["text_emb_extend"],
        np.asarray(encode_prompts(enc, tok, ["(extend) " + CAPTION], 6, fps=5))[0],
        rtol=1e-5,
        atol=1e-6,
    )
    o = args.index("--out")  # an aspect-ratio bucket: frames cropped to 12 x 22 (16:9 of 16^2, even sides)
    wide = args[: o + 1] + [str(tmp_path / "wide")] + args[o + 2 :] + ["--aspect-ratio", "16:9"]
    assert main(wide) == 0 and "latents (3, 4, 6, 11)" in capsys.readouterr().out
    assert ArrayRecordSource(tmp_path / "wide")[0]["latent"].shape == (3, 4, 6, 11)
    i = args.index("--num-frames")
    bad = args[:i] + args[i + 2 :]
    assert main(bad) == 2 and "--videos needs --num-frames" in capsys.readouterr().err
    bad = ["precompute", "--images", str(clips), "--vae", "v", "--text-encoder", "t", "--out", str(tmp_path / "o")]
    assert main(bad) == 2 and "--images needs --captions" in capsys.readouterr().err
