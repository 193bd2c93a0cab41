"""The digits classifier behind ``digits FD`` and sample accuracy: deterministic, accurate
on the held-out split, a small floor and large distances for broken images; its cache."""

import numpy as np
import pytest

from starflow_jax.data.digits import load_digits_splits
from starflow_jax.evaluate import digits_classifier as dc
from starflow_jax.evaluate import frechet


@pytest.fixture(scope="module")
def classifier():
    return dc.train_digits_classifier()


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits()


def _params(model):
    from flax import nnx

    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _digits_fd(model, images, reference_images):
    reference = frechet.feature_statistics(np.asarray(model.features(reference_images)))
    return frechet.frechet_distance(*frechet.feature_statistics(np.asarray(model.features(images))), *reference)


def test_retraining_is_bit_for_bit_identical(classifier):
    again = _params(dc.train_digits_classifier())
    first = _params(classifier)
    assert again.keys() == first.keys()
    for path in first:
        np.testing.assert_array_equal(again[path], first[path], err_msg=str(path))


def test_held_out_accuracy_is_high(classifier, splits):
    _, heldout = splits
    assert dc.accuracy(classifier, heldout.images, heldout.labels) > 0.95
    assert dc.accuracy(classifier, heldout.images, (heldout.labels + 1) % 10) < 0.05


def test_digits_fd_floor_is_small_and_broken_images_are_far(classifier, splits):
    train, heldout = splits
    floor = _digits_fd(classifier, heldout.images, train.images)
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(x.ravel()).reshape(x.shape) for x in heldout.images])
    noise = rng.uniform(-1, 1, size=heldout.images.shape).astype(np.float32)
    shuffled_fd = _digits_fd(classifier, shuffled, train.images)
    noise_fd = _digits_fd(classifier, noise, train.images)
    print(f"digits FD: floor (held-out vs train) {floor:.3f}, shuffled pixels {shuffled_fd:.1f}, noise {noise_fd:.1f}")
    assert floor < 15.0
    assert shuffled_fd > 10 * floor and noise_fd > 10 * floor


def test_cache_round_trip_and_retraining_on_other_settings(classifier, tmp_path):
    path = tmp_path / dc.CACHE_NAME
    dc.save_classifier(path, classifier, dc.TrainingSettings())
    loaded = dc.load_or_train(path, log=lambda m: pytest.fail(f"retrained: {m}"))
    for p, value in _params(classifier).items():
        np.testing.assert_array_equal(_params(loaded)[p], value)
    other = dc.TrainingSettings(steps=5)
    with pytest.raises(ValueError, match="made with settings"):
        dc.load_classifier(path, other)
    messages = []
    dc.load_or_train(path, other, log=messages.append)
    assert messages and "retraining" in messages[0]
    dc.load_classifier(path, other)  # the cache now holds the retrained one
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz: not a readable"):
        dc.load_classifier(tmp_path / "junk.npz")


def test_wrong_image_shape_is_named(classifier):
    with pytest.raises(ValueError, match=r"\(n, 1, 8, 8\)"):
        classifier(np.zeros((2, 3, 8, 8), np.float32))
