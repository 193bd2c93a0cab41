"""The FID Inception-v3 in NNX against torch-fidelity's ``FeatureExtractorInceptionV3``
(random weights saved as a ``.pth``), its resize against torch-fidelity's, and its
weight loading's errors."""

import importlib
import importlib.util
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from starflow_jax.evaluate import inception


def _torch_fidelity_modules():
    """torch-fidelity's Inception and resize modules without its package ``__init__``
    (which imports torchvision, not installable beside the CPU torch here)."""
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[eval-parity]')")
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("torch-fidelity not installed (pip install --no-deps torch-fidelity)")
        bare = types.ModuleType("torch_fidelity")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = bare
    names = ("helpers", "feature_extractor_base", "interpolate_compat_tensorflow", "feature_extractor_inceptionv3")
    return {n: importlib.import_module(f"torch_fidelity.{n}") for n in names}


def _random_torch_inception(tmp_path):
    """torch-fidelity's extractor with random weights (He-scaled convolutions, random batch
    norm statistics, so activations stay of order one), built without any download; and
    the ``.pth`` holding its state dict."""
    import torch

    fe = _torch_fidelity_modules()["feature_extractor_inceptionv3"]

    class RandomInception(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is None:  # the constructor's "download", patched out below
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: None
    try:
        model = RandomInception("inception-v3-compat", ["2048", "logits_unbiased", "logits"])
    finally:
        fe.load_state_dict_from_url = original
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            elif name == "fc":
                module.weight.normal_(0.0, 2048**-0.5)
                module.bias.normal_(0.0, 0.1)
    path = tmp_path / inception.WEIGHT_FILE_NAMES[1]
    torch.save(model.state_dict(), path)
    return model, path


def test_resize_matches_torch_fidelity():
    import torch

    ic = _torch_fidelity_modules()["interpolate_compat_tensorflow"]
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (17, 40), (299, 299), (400, 320)]:
        x = rng.uniform(0, 255, size=(2, 3, h, w)).astype(np.float32)
        want = ic.interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(x), size=(299, 299), align_corners=False)
        got = inception.resize_bilinear_like_tf1(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299))
        np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-4)


@pytest.mark.slow  # about a minute on two CPU cores: the whole network twice at 299x299
def test_features_and_logits_match_torch_fidelity(tmp_path):
    import torch

    torch_model, path = _random_torch_inception(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, size=(2, 3, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        want = [t.numpy() for t in torch_model(torch.from_numpy(images))]
    ours = inception.load_fid_inception(path)(jnp.asarray(images.transpose(0, 2, 3, 1)))
    for name, got, ref in zip(("pool", "logits_unbiased", "logits"), ours, want):
        assert got.shape == ref.shape, name
        error = float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))
        print(f"{name}: max |ours - torch-fidelity| / max |torch-fidelity| = {error:.2e}")
        assert error < 1e-4, (name, error)
    assert float(np.std(want[0])) > 1e-2  # the random network does not collapse its features


def test_missing_weight_file_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_fid_inception(tmp_path / "nope.pth")


def test_state_dict_that_does_not_fit_lists_the_keys():
    from starflow_jax.interop.named_tensors import StateDictMismatch

    state_dict = {"fc.weight": np.zeros((1008, 2048), np.float32), "extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(StateDictMismatch) as info:
        inception.load_fid_inception(state_dict)
    assert "extra.weight" in info.value.unexpected
    assert "Mixed_7c.branch_pool.bn.running_var" in info.value.missing
    assert "fc.bias" in info.value.missing


def test_wrong_image_dtype_is_refused():
    from flax import nnx

    model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="uint8"):
        model(jnp.zeros((1, 8, 8, 3), jnp.float32))
    with pytest.raises(ValueError, match="height, width, 3"):
        model(jnp.zeros((1, 3, 8, 8), jnp.uint8))


def test_reference_statistics_of_an_image_folder(tmp_path, capsys):
    """``eval --stats-from``: the statistics of every image under a folder (nested folders,
    other sizes, hidden folders and other files skipped) equal those of the same images'
    features computed directly; an existing file is not replaced; bad arguments are named."""
    from PIL import Image

    from starflow_jax.cli.main import main
    from starflow_jax.data.image_folder import load_image
    from starflow_jax.evaluate.frechet import feature_statistics, load_statistics
    from starflow_jax.evaluate.scores import inception_features

    _, path = _random_torch_inception(tmp_path)
    root, rng = tmp_path / "real", np.random.default_rng(0)
    files = []
    for i, (sub, size) in enumerate([("a", (20, 24)), ("a", (16, 16)), ("b/c", (30, 18)), ("b", (16, 40))]):
        (root / sub).mkdir(parents=True, exist_ok=True)
        files.append(root / sub / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(files[-1])
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / ".hidden" / "x.png")
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "stats.npz"
    args = ["eval", "--stats-from", str(root), "--image-size", "16", "--inception-weights", str(path)]
    assert main(args + ["--out", str(out)]) == 0
    assert "the statistics of 4 images" in capsys.readouterr().out
    mu, sigma = load_statistics(out)
    pixels = np.stack([np.round((load_image(f, 16, 3).transpose(1, 2, 0) + 1) * 127.5) for f in sorted(files)])
    pool, _ = inception_features(inception.load_fid_inception(path), pixels.astype(np.uint8))
    want_mu, want_sigma = feature_statistics(pool)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-6, atol=1e-9)

    before = out.read_bytes()
    assert main(args + ["--out", str(out)]) == 2  # kept: --overwrite replaces it
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(args[:3] + args[5:] + ["--out", str(tmp_path / "s.npz")]) == 2
    assert "needs --image-size" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "s.json")]) == 2
    assert "FILE.npz" in capsys.readouterr().err
    assert (
        main(
            ["eval", "--stats-from", str(tmp_path / "none"), "--image-size", "16"]
            + args[5:]
            + ["--out", str(tmp_path / "t.npz")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
