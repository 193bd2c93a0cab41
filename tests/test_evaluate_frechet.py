"""Fréchet distance, Inception Score and statistics files: closed forms, and parity with
torchmetrics' ``FrechetInceptionDistance`` and ``InceptionScore`` (given the features
through an identity module, so no Inception weights are needed)."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

from starflow_jax.evaluate import frechet


def _bare_package(name):
    """Register package ``name`` without running its ``__init__`` (torch-fidelity's and
    torchmetrics.image's import torchvision, not installable beside the CPU torch here)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} not installed (pip install --no-deps torch-fidelity torchmetrics lightning-utilities)")
    bare = types.ModuleType(name)
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = bare


def _torchmetrics_image():
    torch = pytest.importorskip("torch", reason="torch not installed")
    _bare_package("torch_fidelity")  # before torchmetrics, whose __init__ imports torch-fidelity when present
    pytest.importorskip("torchmetrics", reason="torchmetrics not installed (pip install --no-deps torchmetrics)")
    _bare_package("torchmetrics.image")
    fid = importlib.import_module("torchmetrics.image.fid")
    inception = importlib.import_module("torchmetrics.image.inception")

    class Identity(torch.nn.Module):
        def __init__(self, num_features):
            super().__init__()
            self.num_features = num_features

        def forward(self, x):
            return x

    return torch, fid, inception, Identity


def _feature_sets(n=400, d=32, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + 1.0
    b = rng.standard_t(5, size=(n + 37, d)) @ rng.normal(size=(d, d)) * 0.3
    return a, b


def test_statistics_are_mean_and_unbiased_covariance():
    a, _ = _feature_sets()
    mu, sigma = frechet.feature_statistics(a.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-5, atol=1e-6)


def test_frechet_distance_closed_forms():
    a, b = _feature_sets()
    mu, sigma = frechet.feature_statistics(a)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    shift = np.arange(mu.shape[0], dtype=np.float64)
    assert frechet.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)
    # commuting covariances: sum (sqrt(s1) - sqrt(s2))^2 over the eigenvalues
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 16.0])
    assert frechet.frechet_distance(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx(1 + 1 + 1, rel=1e-12)
    mu2, sigma2 = frechet.feature_statistics(b)
    assert frechet.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(
        frechet.frechet_distance(mu2, sigma2, mu, sigma), rel=1e-9
    )


def test_frechet_distance_matches_torchmetrics():
    torch, fid, _, identity = _torchmetrics_image()
    a, b = _feature_sets()
    metric = fid.FrechetInceptionDistance(feature=identity(a.shape[1]))
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    want = float(metric.compute())
    got = frechet.frechet_distance(*frechet.feature_statistics(a), *frechet.feature_statistics(b))
    direct = float(
        fid._compute_fid(*map(torch.from_numpy, (*frechet.feature_statistics(a), *frechet.feature_statistics(b))))
    )
    print(f"FD: ours {got!r}, torchmetrics {want!r} (relative {abs(got - want) / want:.2e}), _compute_fid {direct!r}")
    assert got == pytest.approx(want, rel=1e-4)
    assert got == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("n, splits", [(500, 10), (53, 10), (7, 4), (20, 1)])
def test_inception_score_matches_torchmetrics(n, splits):
    torch, _, inception, identity = _torchmetrics_image()
    logits = np.random.default_rng(n).normal(size=(n, 30)) * 3.0
    metric = inception.InceptionScore(feature=identity(30), splits=splits)
    metric.update(torch.from_numpy(logits))
    torch.manual_seed(n)
    want_mean, want_std = (float(v) for v in metric.compute())
    torch.manual_seed(n)
    order = torch.randperm(n).numpy()  # torchmetrics shuffles first; ours keeps the caller's order
    mean, std = frechet.inception_score(logits[order], splits=splits)
    print(f"IS n={n} splits={splits}: ours {mean!r} ± {std!r}, torchmetrics {want_mean!r} ± {want_std!r}")
    assert mean == pytest.approx(want_mean, rel=1e-4)
    if np.isnan(want_std):
        assert np.isnan(std)
    else:
        assert std == pytest.approx(want_std, rel=1e-4)


def test_inception_score_bounds():
    confident = np.eye(10)[np.arange(100) % 10] * 50.0  # sure and evenly spread: the number of classes
    assert frechet.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    uniform = np.zeros((100, 10))
    assert frechet.inception_score(uniform, splits=2)[0] == pytest.approx(1.0)


def test_statistics_file_round_trip_and_errors(tmp_path):
    a, _ = _feature_sets()
    mu, sigma = frechet.feature_statistics(a)
    path = tmp_path / "stats.npz"
    frechet.save_statistics(path, mu, sigma)
    with np.load(path) as data:  # pytorch-fid's format: arrays mu and sigma
        assert sorted(data.files) == ["mu", "sigma"]
    got_mu, got_sigma = frechet.load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        frechet.load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
        frechet.load_statistics(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable"):
        frechet.load_statistics(tmp_path / "junk.npz")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2"):
        frechet.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        frechet.feature_statistics(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="splits"):
        frechet.inception_score(np.zeros((3, 5)), splits=4)
