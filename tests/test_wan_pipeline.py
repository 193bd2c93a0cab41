"""The Wan video VAE in the workflows: `sample --vae` decodes a video model's latent frames
to an MP4 through a converted (tiny, random) diffusers AutoencoderKLWan, keeps an input
image's latent as the first frame, and `precompute --videos` encodes clips to latent shards
through it."""

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from starflow_jax.cli.main import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VIDEO_TINY = str(ROOT / "configs" / "video_tiny_cpu.py")
WAN21 = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    scale_factor_spatial=8,
    latents_mean=[0.1, -0.2, 0.0, 0.3],
    latents_std=[1.5, 0.8, 1.0, 2.0],
)
# a video model over the VAE's latents: 4 channels, 32x32 pixels -> 4x4 latents
MODEL = ["--set", "model.in_channels=4", "--set", "model.img_size=4", "--set", "model.patch_size=1"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(**WAN21).eval().save_pretrained(str(path))
    return path


def test_sample_video_model_decodes_through_the_wan_vae(wan_dir, tmp_path):
    from starflow_jax.autoencoders import decode_video, wan_from_diffusers
    from starflow_jax.sampling.visualize import read_video_frames

    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "sample",
                "--config",
                VIDEO_TINY,
                "--random-init",
                *MODEL,
                "--labels",
                "1",
                "--num",
                "1",
                "--num-frames",
                "3",
                "--vae",
                str(wan_dir),
                "--no-denoise",
                "--out",
                str(out),
                "--save-npy",
                str(tmp_path / "x.npy"),
            ]
        )
        == 0
    )
    x = np.load(tmp_path / "x.npy")
    # 3 latent frames -> 1 + 4 * 2 = 9 frames of 32x32 RGB
    assert x.shape == (1, 9, 3, 32, 32) and np.all(np.abs(x) <= 1.0)
    assert read_video_frames(out).shape[:3] == (9, 34, 34)  # 32 + 2 pixels of grid padding
    # image-to-video through the VAE: the image's latent is the first latent frame, so the
    # first decoded frame equals decoding that latent alone (the decoder is causal in time)
    img = (np.random.default_rng(0).uniform(0, 255, (32, 32, 3))).astype(np.uint8)
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "first.png")
    assert (
        main(
            [
                "sample",
                "--config",
                VIDEO_TINY,
                "--random-init",
                *MODEL,
                "--labels",
                "1",
                "--num",
                "1",
                "--num-frames",
                "3",
                "--vae",
                str(wan_dir),
                "--no-denoise",
                "--input-image",
                str(tmp_path / "first.png"),
                "--set",
                "train.noise_type=gaussian",
                "--noise-std",
                "0",
                "--out",
                str(tmp_path / "i2v.gif"),
                "--save-npy",
                str(tmp_path / "i2v.npy"),
            ]
        )
        == 0
    )
    vae = wan_from_diffusers(str(wan_dir))
    from starflow_jax.autoencoders import encode_video

    z0 = encode_video(vae, (img.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, None])
    want = np.asarray(decode_video(vae, z0))[0, 0]
    np.testing.assert_allclose(np.load(tmp_path / "i2v.npy")[0, 0], want, atol=1e-4)


def test_precompute_videos_through_the_wan_vae(wan_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from conftest import make_t5_tokenizer

    from starflow_jax.autoencoders import encode_video, wan_from_diffusers
    from starflow_jax.data.array_record import ArrayRecordSource
    from starflow_jax.data.video import VideoFolderSource
    from starflow_jax.sampling.visualize import save_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(1)
    save_mp4(videos / "a.mp4", [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(12)], fps=8)
    (videos / "a.txt").write_text("noise that moves")
    tok_dir = make_t5_tokenizer(tmp_path)
    torch.manual_seed(0)
    transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=200, d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32, feed_forward_proj="gated-gelu"
        )
    ).save_pretrained(str(tok_dir))
    args = [
        "precompute",
        "--videos",
        str(videos),
        "--vae",
        str(wan_dir),
        "--text-encoder",
        str(tok_dir),
        "--out",
        str(tmp_path / "shards"),
        "--image-size",
        "32",
        "--txt-size",
        "6",
        "--num-frames",
        "9",
    ]
    assert main(args) == 0
    assert "latents (3, 4, 4, 4)" in capsys.readouterr().out
    rec = ArrayRecordSource(tmp_path / "shards")[0]
    clip = VideoFolderSource(videos, 9, 32, seed=0)[0]["video"]
    want = np.asarray(encode_video(wan_from_diffusers(str(wan_dir)), clip[None]))[0]
    np.testing.assert_allclose(rec["latent"], want, rtol=1e-5, atol=1e-5)
    bad = args[: args.index("--num-frames")] + ["--num-frames", "8", "--out", str(tmp_path / "o2")]
    assert main(bad) == 2 and "encodes 1 + 4k frames" in capsys.readouterr().err


def test_bench_vae_writes_rows_and_memory(tmp_path, capsys):
    import json

    out = tmp_path / "vae.json"
    args = [
        "bench",
        "vae",
        "--frames",
        "5",
        "--size",
        "32",
        "--base-dim",
        "8",
        "--repeats",
        "1",
        "--memory-frames",
        "2,4",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    reference = True
    data = json.loads(out.read_text())
    impls = {(r["impl"], r["op"]) for r in data["rows"]}
    want = {
        (i, op)
        for i in ("jax-chunked", "jax-whole") + (("diffusers",) if reference else ())
        for op in ("encode", "decode")
    }
    assert impls == want and all(r["frames_per_s"] > 0 for r in data["rows"])
    mem = data["decode_memory"]
    assert mem["cache_mib"] > 0 and set(mem["whole_mib"]) == {"2", "4"}
    assert "decoding memory" in capsys.readouterr().out
