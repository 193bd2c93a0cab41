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
