"""Text to image end to end: `starflow-jax sample --prompt ... --text-encoder DIR --vae DIR`
on a tiny random flow, a small random T5 (with a tokenizer built offline) and a small
random diffusers VAE, with guidance, Jacobi and an aspect ratio: a PNG of decoded pixels."""

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from starflow_jax.cli.main import main  # noqa: E402
from starflow_jax.sampling.shapes import size_for_aspect_ratio  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from conftest import make_t5_tokenizer

    root = tmp_path_factory.mktemp("t2i")
    tok_dir = make_t5_tokenizer(root)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=200, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, feed_forward_proj="gated-gelu"
        )
    )
    t5.save_pretrained(str(tok_dir))  # the tokenizer files and the weights in one directory, as on the hub
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    )
    vae.save_pretrained(str(root / "vae"))
    model = dict(
        in_channels=4,
        img_size=8,
        patch_size=1,
        channels=64,
        num_blocks=2,
        layers_per_block=[1, 1],
        head_dim=32,
        rope=1,
        sos=1,
        txt_size=6,
        txt_dim=32,
        cond_top_only=1,
        use_softplus=1,
        use_final_norm=1,
        soft_clip=4.0,
        seq_order="L2R",
    )
    (root / "flow.json").write_text(json.dumps(model))
    return root, tok_dir


def test_prompt_to_png_through_t5_and_the_vae(checkpoints, capsys):
    root, text_dir = checkpoints
    out = root / "t2i.png"
    assert (
        main(
            [
                "sample",
                "--config",
                str(root / "flow.json"),
                "--random-init",
                "--prompt",
                "a red cat",
                "--prompt",
                "the dog",
                "--num",
                "2",
                "--text-encoder",
                str(text_dir),
                "--vae",
                str(root / "vae"),
                "--cfg",
                "1.5",
                "--jacobi",
                "--jacobi-block-size",
                "8",
                "--aspect-ratio",
                "16:9",
                "--noise-std",
                "0.3",
                "--out",
                str(out),
                "--save-npy",
                str(root / "x.npy"),
            ]
        )
        == 0
    )
    h, w = size_for_aspect_ratio(8 * 2, "16:9", 2)  # latent 8x8, VAE factor 2: pixel sides multiples of 2
    assert (h, w) == (12, 22)
    x = np.load(root / "x.npy")
    assert x.shape == (2, 3, h, w) and np.all(np.isfinite(x))  # decoded RGB pixels
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == (2 * (w + 1) + 1, h + 2)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", "a cat"], "need --text-encoder"),
        (["--prompt", "a cat", "--labels", "1"], "give exactly one of --labels, --cond or --prompt"),
    ],
)
def test_prompt_errors(checkpoints, tmp_path, capsys, extra, message):
    root, _ = checkpoints
    assert (
        main(
            [
                "sample",
                "--config",
                str(root / "flow.json"),
                "--random-init",
                "--num",
                "1",
                "--out",
                str(tmp_path / "x.png"),
            ]
            + extra
        )
        == 2
    )
    assert message in capsys.readouterr().err


def test_text_encoder_width_must_match(checkpoints, tmp_path, capsys):
    root, text_dir = checkpoints
    cfg = json.loads((root / "flow.json").read_text())
    (tmp_path / "flow.json").write_text(json.dumps(dict(cfg, txt_dim=48)))
    assert (
        main(
            [
                "sample",
                "--config",
                str(tmp_path / "flow.json"),
                "--random-init",
                "--num",
                "1",
                "--prompt",
                "a cat",
                "--text-encoder",
                str(text_dir),
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "gives 32-dim embeddings, the model reads txt_dim=48" in capsys.readouterr().err


def test_precompute_writes_training_shards_and_resumes(checkpoints, tmp_path, capsys):
    """Images + captions -> VAE latents and T5 embeddings in ArrayRecord shards, equal to
    encoding them directly; a rerun skips the complete shards; other settings are refused."""
    from starflow_jax.autoencoders import encode_latents, vae_from_diffusers
    from starflow_jax.data.array_record import TRAIN_STEP_KEYS, ArrayRecordSource
    from starflow_jax.data.image_folder import load_image
    from starflow_jax.text import encode_prompts, load_tokenizer, t5_from_transformers

    root, text_dir = checkpoints
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + i, 18, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        lines.append(f"{i}.png\ta picture number {i}")
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    args = [
        "precompute",
        "--images",
        str(tmp_path / "imgs"),
        "--captions",
        str(tmp_path / "captions.tsv"),
        "--vae",
        str(root / "vae"),
        "--text-encoder",
        str(text_dir),
        "--out",
        str(tmp_path / "shards"),
        "--image-size",
        "16",
        "--txt-size",
        "6",
        "--batch-size",
        "2",
        "--records-per-shard",
        "2",
    ]
    assert main(args) == 0
    src = ArrayRecordSource(tmp_path / "shards", fields=list(TRAIN_STEP_KEYS), rename=TRAIN_STEP_KEYS)
    assert len(src) == 5 and src[0]["image"].shape == (4, 8, 8) and src[0]["cond"].shape == (6, 32)
    vae = vae_from_diffusers(str(root / "vae"))
    want = np.asarray(encode_latents(vae, load_image(tmp_path / "imgs" / "3.png", 16, 3)[None]))[0]
    np.testing.assert_allclose(src[3]["image"], want, rtol=1e-5, atol=1e-6)
    enc, tok = t5_from_transformers(str(text_dir)), load_tokenizer(text_dir)
    np.testing.assert_allclose(
        src[3]["cond"], np.asarray(encode_prompts(enc, tok, ["a picture number 3"], 6))[0], rtol=1e-5, atol=1e-6
    )
    assert str(ArrayRecordSource(tmp_path / "shards")[4]["caption"]) == "a picture number 4"
    capsys.readouterr()
    assert main(args) == 0  # resume: everything is there
    assert capsys.readouterr().out.count("already complete: skipped") == 3
    assert main(args[:-1] + ["3"]) == 2  # another shard size
    assert "precomputed with other settings (records_per_shard)" in capsys.readouterr().err


def test_precompute_train_and_sample_from_a_prompt(checkpoints, tmp_path):
    """The whole latent pipeline: images made here -> precompute -> train on the shards ->
    sample --prompt from the trained workdir through T5 and the VAE decoder -> PNG."""
    import pathlib

    root, text_dir = checkpoints
    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    captions = ["a red square", "a blue circle", "the green cat", "a dog"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.jpg", "caption": captions[i % 4]}) + "\n" for i in range(8))
    )
    assert (
        main(
            [
                "precompute",
                "--images",
                str(tmp_path / "imgs"),
                "--captions",
                str(tmp_path / "c.jsonl"),
                "--vae",
                str(root / "vae"),
                "--text-encoder",
                str(text_dir),
                "--out",
                str(tmp_path / "shards"),
                "--image-size",
                "16",
                "--txt-size",
                "6",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "t2i_latents_tiny.py")
    assert (
        main(
            [
                "train",
                "--config",
                config,
                "--workdir",
                str(tmp_path / "run"),
                "--set",
                f"data.path={tmp_path / 'shards'}",
                "--set",
                "model.txt_dim=32",
                "--set",
                "model.txt_size=6",
                "--set",
                "model.channels=64",
                "--set",
                "model.layers_per_block=[1, 0, 1]",
                "--set",
                "train.steps=3",
                "--set",
                "train.batch_size=4",
                "--set",
                "train.warmup_steps=1",
                "--set",
                "train.log_every=1",
                "--set",
                "train.checkpoint_every=3",
                "--set",
                "sample.num=2",
                "--set",
                "sample.scale=1",
            ]
        )
        == 0
    )
    assert (tmp_path / "run" / "samples.png").exists()
    out = tmp_path / "cat.png"
    assert (
        main(
            [
                "sample",
                "--workdir",
                str(tmp_path / "run"),
                "--prompt",
                "the green cat",
                "--num",
                "2",
                "--text-encoder",
                str(text_dir),
                "--vae",
                str(root / "vae"),
                "--cfg",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == (2 * 17 + 1, 17 + 1)  # two 16x16 decoded pictures


def test_precompute_an_aspect_ratio_bucket_with_the_templates(checkpoints, tmp_path, capsys):
    """--aspect-ratio 16:9: pictures cropped to the bucket's size (multiples of the VAE
    factor), captions through the image fps, noise-level and aspect-ratio templates."""
    from starflow_jax.data.array_record import ArrayRecordSource
    from starflow_jax.data.buckets import bucket_size
    from starflow_jax.text import encode_prompts, load_tokenizer, prepare_prompts, t5_from_transformers

    root, text_dir = checkpoints
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(
        tmp_path / "imgs" / "0.png"
    )
    (tmp_path / "captions.tsv").write_text("0.png\ta wide picture\n")
    out = tmp_path / "buckets" / "16x9"
    assert (
        main(
            [
                "precompute",
                "--images",
                str(tmp_path / "imgs"),
                "--captions",
                str(tmp_path / "captions.tsv"),
                "--vae",
                str(root / "vae"),
                "--text-encoder",
                str(text_dir),
                "--out",
                str(out),
                "--image-size",
                "32",
                "--txt-size",
                "6",
                "--aspect-ratio",
                "16:9",
                "--fps-cond",
                "--noise-level-cond",
                "0.5",
            ]
        )
        == 0
    )
    h, w = bucket_size(32, "16:9", 2)
    assert (h, w) == (24, 42) and "latents (4, 12, 21)" in capsys.readouterr().out
    rec = ArrayRecordSource(out)[0]
    assert rec["latent"].shape == (4, 12, 21) and tuple(rec["size"]) == (24, 42)
    text = prepare_prompts(["a wide picture"], fps=0, noise_std=0.5, aspect_ratio="16:9")
    want = encode_prompts(t5_from_transformers(str(text_dir)), load_tokenizer(text_dir), text, 6)
    np.testing.assert_allclose(rec["text_emb"], np.asarray(want)[0], rtol=1e-5, atol=1e-6)
    assert (
        main(
            [
                "precompute",
                "--images",
                str(tmp_path / "imgs"),
                "--captions",
                str(tmp_path / "captions.tsv"),
                "--vae",
                str(root / "vae"),
                "--text-encoder",
                str(text_dir),
                "--out",
                str(tmp_path / "x"),
                "--aspect-ratio",
                "7:5",
            ]
        )
        == 2
    )
    assert "not a bucket" in capsys.readouterr().err


def _tiny_clip_with_tokenizer(directory):
    """A random transformers CLIP checkpoint with a CLIP tokenizer of the letters a-c."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abc":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    torch.manual_seed(1)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    text.update(num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, pad_token_id=1, eos_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)


@pytest.mark.slow  # sampling, VAE decoding and CLIP compiled for three batches: about a minute
def test_eval_of_a_text_to_image_model_decodes_and_scores_against_the_prompts(checkpoints, tmp_path, capsys):
    """`eval --prompts --text-encoder --vae --clip`: latent samples decoded to pixels, each
    scored against its own prompt (cycled over the samples); the CLIP score equals the one
    computed from the saved pixels directly."""
    import jax.numpy as jnp

    from starflow_jax.evaluate import clip
    from starflow_jax.sampling.visualize import to_uint8

    root, text_dir = checkpoints
    _tiny_clip_with_tokenizer(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("a b\n\nc a b\nb\n")
    out, npy = tmp_path / "e.json", tmp_path / "x.npy"
    args = ["eval", "--config", str(root / "flow.json"), "--random-init", "--num", "5", "--batch-size", "2"]
    args += ["--prompts", str(tmp_path / "prompts.txt"), "--text-encoder", str(text_dir), "--vae", str(root / "vae")]
    args += ["--clip", str(tmp_path / "clip"), "--cfg", "1.5", "--out", str(out), "--save-npy", str(npy)]
    assert main(args) == 0
    assert "CLIP score" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["options"]["prompts"] == ["a b", "c a b", "b"]
    x = np.load(npy)
    assert x.shape == (5, 3, 16, 16) and np.all(np.isfinite(x))  # decoded pixels (latent 8x8, factor 2)
    model = clip.load_clip(tmp_path / "clip")
    pixels = clip.preprocess_images(to_uint8(x, pixel_space=True), 32)
    ids = clip.tokenize(tmp_path / "clip", ["a b", "c a b", "b", "a b", "c a b"])
    want = clip.clip_score(model.image_features(jnp.asarray(pixels)), model.text_features(jnp.asarray(ids)))
    raw = float(jnp.mean(clip.clip_scores(model.image_features(jnp.asarray(pixels)), model.text_features(ids))))
    assert result["metrics"]["clip_score_mean"] == pytest.approx(raw, rel=1e-5, abs=1e-5)  # before the clamp
    assert result["metrics"]["clip_score"] == pytest.approx(float(want), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--clip", "c"], "needs --prompts"),
        (["--prompts", "p.txt"], "need --text-encoder"),
        (["--prompts", "missing.txt", "--text-encoder", "t", "--clip", "c"], "does not exist"),
    ],
)
def test_eval_prompt_errors(checkpoints, tmp_path, capsys, monkeypatch, extra, message):
    root, _ = checkpoints
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a\n")
    args = ["eval", "--config", str(root / "flow.json"), "--random-init", "--out", "e.json", "--vae", str(root / "vae")]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # precompute, train, and sample + decode + CLIP at the end: about a minute
def test_training_of_a_latent_text_model_reports_the_clip_score_of_its_samples(checkpoints, tmp_path):
    """config.eval on a text-to-image latent model trained on precomputed shards: samples
    conditioned on the records' text embeddings, decoded by eval.vae, scored by eval.clip
    against the records' captions; the score equals the one recomputed from the checkpoint."""
    import pathlib

    import jax.numpy as jnp

    from starflow_jax.config import load_config
    from starflow_jax.data.array_record import ArrayRecordSource
    from starflow_jax.evaluate import clip, quality
    from starflow_jax.sampling.pipeline import Conditioning, TrainingNoise, generate
    from starflow_jax.sampling.visualize import to_uint8
    from starflow_jax.train.loop import train
    from starflow_jax.train.sample_quality import preview_options
    from starflow_jax.workdir.params import model_from_workdir

    root, text_dir = checkpoints
    _tiny_clip_with_tokenizer(tmp_path / "clip")
    rng = np.random.default_rng(2)
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.jpg")
    captions = ["a b", "c", "b a c"]
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.jpg", "caption": captions[i % 3]}) + "\n" for i in range(6))
    )
    args = ["precompute", "--images", str(tmp_path / "imgs"), "--captions", str(tmp_path / "c.jsonl")]
    args += ["--vae", str(root / "vae"), "--text-encoder", str(text_dir), "--out", str(tmp_path / "shards")]
    assert main(args + ["--image-size", "16", "--txt-size", "6", "--batch-size", "3"]) == 0
    config = load_config(
        pathlib.Path(__file__).resolve().parents[1] / "configs" / "t2i_latents_tiny.py",
        [
            f"data.path={tmp_path / 'shards'}",
            "model.txt_dim=32",
            "model.txt_size=6",
            "model.channels=64",
            "model.layers_per_block=[1, 0, 1]",
            "train.steps=2",
            "train.batch_size=3",
            "train.warmup_steps=1",
            "train.log_every=1",
            "sample.num=2",
            "sample.scale=1",
            "eval.num_samples=5",
            "eval.batch_size=3",
            f"eval.vae={root / 'vae'}",
            f"eval.clip={tmp_path / 'clip'}",
        ],
    )
    result = train(config, tmp_path / "run", log=lambda *a: None)
    assert np.isfinite(result["clip_score_mean"]) and result["clip_score"] == max(result["clip_score_mean"], 0.0)

    # the same samples from the saved parameters, scored against records 0..4's captions
    from starflow_jax.autoencoders.loading import load_autoencoder

    _, model = model_from_workdir(tmp_path / "run", ema=float(config.train.ema_decay) > 0)
    records, vae = ArrayRecordSource(tmp_path / "shards"), load_autoencoder(str(root / "vae"))
    opts, cfg = preview_options(config, 0.0), model.cfg
    pixels = []
    for b, (start, n) in enumerate(((0, 3), (3, 2))):
        y = jnp.asarray(np.stack([records[start + j]["text_emb"] for j in range(n)]), jnp.float32)
        x = generate(
            model,
            (n, cfg.in_channels, cfg.img_size, cfg.img_size),
            quality.batch_seed(0, b),
            Conditioning(y, jnp.zeros_like(y)),
            opts,
            noise=TrainingNoise.from_config(config),
            decode=vae.decode,
        ).x
        pixels.append(to_uint8(x, pixel_space=True))
    texts = [str(records[i]["caption"]) for i in range(5)]
    ids = clip.tokenize(tmp_path / "clip", texts)
    want = quality.clip_quality(clip.load_clip(tmp_path / "clip"), np.concatenate(pixels), ids)
    assert result["clip_score_mean"] == pytest.approx(want["clip_score_mean"], rel=1e-4, abs=1e-4)
