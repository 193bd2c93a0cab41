"""An offline quality score for models of the embedded digits (no Inception weights ship
here): a small MLP classifier trained deterministically, in seconds on a CPU, on the
digits' training split (``data.digits.load_digits_splits``, the split ``configs/tiny_cpu.py``
trains on), and cached as an ``.npz``.

* ``digits FD``: the Fréchet distance (``evaluate.frechet``) between the 64-d features of
  its penultimate layer on two image sets; it is *not* an FID (no Inception network).
  The reference set is the training split; the floor is the held-out split's distance to it.
* accuracy: the share of class-conditional samples it classifies as their own labels.

Images in: ``(n, 1, 8, 8)`` (or ``(n, 8, 8)``) float in [-1, 1], the data's own scale.
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from starflow_jax import storage
from starflow_jax.data.digits import LEVELS, NUM_CLASSES, load_digits_splits

__all__ = [
    "CACHE_NAME",
    "TrainingSettings",
    "DigitsClassifier",
    "train_digits_classifier",
    "save_classifier",
    "load_classifier",
    "load_or_train",
    "accuracy",
]

CACHE_NAME = "digits_classifier.npz"  # in the workdir, unless a path is given
PIXELS = 64


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """Everything the trained weights depend on (a cache made with others is retrained)."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 250
    learning_rate: float = 3e-3
    hidden: tuple[int, int] = (128, 64)
    num_train: int = 1500  # the digits' split (data.num_train, data.split_seed)
    split_seed: int = 0
    version: int = 1  # of this recipe


def _flat_images(images) -> jax.Array:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != PIXELS:
        raise ValueError(f"digits images must be (n, 1, 8, 8) or (n, 8, 8) in [-1, 1], got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], PIXELS)


class DigitsClassifier(nnx.Module):
    """Two ReLU layers and a linear head; ``features`` is the second layer's output."""

    def __init__(self, hidden: tuple[int, int] = (128, 64), *, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(PIXELS, hidden[0], rngs=rngs)
        self.hidden2 = nnx.Linear(hidden[0], hidden[1], rngs=rngs)
        self.head = nnx.Linear(hidden[1], NUM_CLASSES, rngs=rngs)

    def features(self, images) -> jax.Array:
        x = _flat_images(images)
        return jax.nn.relu(self.hidden2(jax.nn.relu(self.hidden1(x))))

    def __call__(self, images) -> jax.Array:
        return self.head(self.features(images))


def train_digits_classifier(settings: TrainingSettings = TrainingSettings()) -> DigitsClassifier:
    """The classifier trained on the digits' training split: Adam on shuffled minibatches,
    inputs jittered by up to half a grey level (samples are dequantised); every random draw
    comes from ``settings.seed``, so retraining gives the same weights bit for bit."""
    train, _ = load_digits_splits(settings.num_train, settings.split_seed)
    images, labels = jnp.asarray(train.images.reshape(len(train), PIXELS)), jnp.asarray(train.labels)
    model = DigitsClassifier(settings.hidden, rngs=nnx.Rngs(settings.seed))
    graphdef, params = nnx.split(model)
    optimizer = optax.adam(settings.learning_rate)
    half_level = 1.0 / (LEVELS - 1)  # pixels in [-1, 1]: one grey level is 2 / (LEVELS - 1)
    n, batch = len(train), min(settings.batch_size, len(train))
    per_epoch = n // batch

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(carry, i):
        p, opt_state, key = carry
        epoch_key = jax.random.fold_in(key, i // per_epoch)
        order = jax.random.permutation(epoch_key, n)
        rows = jax.lax.dynamic_slice_in_dim(order, (i % per_epoch) * batch, batch)
        jitter = jax.random.uniform(jax.random.fold_in(key, -1 - i), (batch, PIXELS), minval=-1, maxval=1)
        grads = jax.grad(loss_fn)(p, images[rows] + half_level * jitter, labels[rows])
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state, key), None

    carry = (params, optimizer.init(params), jax.random.key(settings.seed + 1))
    (params, _, _), _ = jax.lax.scan(step, carry, jnp.arange(settings.steps))
    return nnx.merge(graphdef, params)


def accuracy(model: DigitsClassifier, images, labels) -> float:
    """The share of ``images`` that ``model`` classifies as ``labels``."""
    labels = np.asarray(labels)
    predicted = np.asarray(jnp.argmax(model(images), axis=-1))
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.shape[0]} images but labels of shape {labels.shape}")
    return float(np.mean(predicted == labels))


def _settings_json(settings: TrainingSettings) -> str:
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


def save_classifier(path, model: DigitsClassifier, settings: TrainingSettings) -> None:
    """``model``'s parameters and the settings that made them, as one ``.npz``."""
    arrays = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    buffer = io.BytesIO()
    np.savez(buffer, settings=np.asarray(_settings_json(settings)), **arrays)
    storage.as_path(path).write_bytes(buffer.getvalue())


def load_classifier(path, settings: TrainingSettings = TrainingSettings()) -> DigitsClassifier:
    """The classifier cached at ``path``; ValueError when the file is unreadable or was
    made with other settings."""
    try:
        with np.load(io.BytesIO(storage.as_path(path).read_bytes()), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable digits classifier .npz: {e}") from e
    saved = str(arrays.pop("settings", ""))
    if saved != _settings_json(settings):
        raise ValueError(f"{path}: made with settings {saved or '(none)'}, not {_settings_json(settings)}")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DigitsClassifier(settings.hidden, rngs=nnx.Rngs(0))))
    flat = []
    for p, v in nnx.to_flat_state(state):
        name = "/".join(map(str, p))
        if name not in arrays or arrays[name].shape != v.get_value().shape:
            raise ValueError(f"{path}: parameter {name} missing or mis-shaped")
        flat.append((p, v.replace(jnp.asarray(arrays[name]))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_or_train(path, settings: TrainingSettings = TrainingSettings(), log=print) -> DigitsClassifier:
    """The classifier cached at ``path``, trained (and cached there) when the file is
    absent, unreadable or made with other settings."""
    if storage.as_path(path).exists():
        try:
            return load_classifier(path, settings)
        except ValueError as e:
            log(f"retraining the digits classifier: {e}")
    model = train_digits_classifier(settings)
    save_classifier(path, model, settings)
    return model
