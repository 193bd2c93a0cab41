"""Parameter names both ways between this model and the PyTorch reference's
``transformer_flow.Model.state_dict()``.

Our parameters are an ``nnx.State`` whose Transformer layers are stacked along a
leading axis and whose dense kernels are ``(in, out)``; the reference has one
entry per layer (``blocks.2.attn_blocks.5.attention.qkv.weight``) and torch's
``(out, in)`` weights. The mapping is a pure renaming plus transposes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.model import StarFlow

# Our module names that differ from the reference's.
_RENAME = {"fc1": "main.0", "fc2": "main.2", "kernel": "weight"}
_RENAME_BACK = {"main.0": "fc1", "main.2": "fc2"}
STACK = "attn_blocks"


class StateDictFileError(ValueError):
    """A file that holds no readable state dict (not a mapping of names to tensors, corrupt,
    or refused by ``torch.load(weights_only=True)``)."""


class StateDictMismatch(ValueError):
    """A reference state dict that does not fit the configured architecture."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), nonfinite=(), wrong_dtype=()):
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        self.mismatched, self.nonfinite = sorted(mismatched), sorted(nonfinite)
        self.wrong_dtype = sorted(wrong_dtype)
        lines = ["the state dict does not match the model configuration:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {self.missing}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {self.unexpected}")
        if self.mismatched:
            lines.append(
                f"  mis-shaped keys ({len(self.mismatched)}): "
                + ", ".join(f"{k}: got {g}, expected {e}" for k, g, e in self.mismatched)
            )
        if self.nonfinite:
            lines.append(f"  keys with NaN or Inf ({len(self.nonfinite)}): {self.nonfinite}")
        if self.wrong_dtype:
            lines.append(
                f"  keys that are not floating point ({len(self.wrong_dtype)}): "
                + ", ".join(f"{k}: {d}" for k, d in self.wrong_dtype)
            )
        super().__init__("\n".join(lines))


def is_deprecated_buffer(name: str) -> bool:
    """Buffers the reference keeps for old checkpoints; they carry no information."""
    return (
        name.endswith(".attn_mask")
        or name in ("var", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
        or name.startswith("feat_rope_gen.")
    )


def _path_str(path: Iterable[Any]) -> list[str]:
    return [str(p) for p in path]


def reference_names(path: tuple, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    """Reference names for one of our leaves and, for each, how to slice it: a list of
    ``(name, (layer_index or None, transpose))``."""
    parts = _path_str(path)
    transpose = parts[-1] == "kernel"
    parts = [_RENAME.get(p, p) for p in parts]
    if STACK in parts:
        i = parts.index(STACK)
        head, tail = parts[: i + 1], parts[i + 1 :]
        return [(".".join(head + [str(j)] + tail), (j, transpose)) for j in range(shape[0])]
    return [(".".join(parts), (None, transpose))]


def _flat_params(state: nnx.State) -> list[tuple[tuple, Any]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def _value(v):
    return v.get_value() if hasattr(v, "get_value") else v


def to_reference(state: nnx.State, release: bool = False) -> dict[str, np.ndarray]:
    """Our parameter state to reference names and layouts (NumPy arrays, same dtype).

    Leaf by leaf; with ``release`` each device array is deleted as soon as it has been
    copied out, so that the conversion never holds two full copies of the parameters."""
    out = {}
    for path, var in _flat_params(state):
        value = _value(var)
        arr = np.array(jax.device_get(value))
        if release and isinstance(value, jax.Array):
            value.delete()
        for name, (layer, transpose) in reference_names(path, arr.shape):
            a = arr[layer] if layer is not None else arr
            out[name] = np.ascontiguousarray(a.T) if transpose else np.ascontiguousarray(a)
        del arr
    return out


def expected_reference_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """Reference name to the shape the reference has, from our (possibly abstract) state."""
    shapes = {}
    for path, var in _flat_params(state):
        shape = tuple(_value(var).shape)
        for name, (layer, transpose) in reference_names(path, shape):
            s = shape[1:] if layer is not None else shape
            shapes[name] = tuple(reversed(s)) if transpose else tuple(s)
    return shapes


def from_reference(
    state: nnx.State, state_dict: Mapping[str, Any], *, check_finite: bool = True, report: list | None = None
) -> nnx.State:
    """Fill ``state`` (concrete or abstract, e.g. from ``nnx.eval_shape``) with the
    reference state dict's values; returns a new state.

    Deprecated buffers are ignored (their names are appended to ``report`` when
    given). Anything else that does not fit raises one ``StateDictMismatch``
    listing missing, unexpected, mis-shaped and non-finite keys."""
    sd = {}
    ignored = []
    for k, v in state_dict.items():
        if is_deprecated_buffer(k):
            ignored.append(k)
        else:
            sd[k] = v
    if report is not None:
        report.extend(sorted(ignored))
    flat = _flat_params(state)
    arrays = gather_named(
        [(path, tuple(_value(var).shape), _value(var).dtype) for path, var in flat],
        lambda path, shape: [(n, layer, t) for n, (layer, t) in reference_names(path, shape)],
        sd,
        check_finite=check_finite,
    )
    leaves = []
    for path, var in flat:
        leaves.append(
            (
                path,
                var.replace(jax.numpy.asarray(arrays[path]))
                if hasattr(var, "replace")
                else jax.numpy.asarray(arrays[path]),
            )
        )
    return nnx.from_flat_state(leaves)


def gather_named(leaves, names_of, state_dict: Mapping[str, Any], *, check_finite: bool = True) -> dict:
    """Arrays for our parameter leaves ``[(path, shape, dtype), ...]`` from a state dict of
    another naming: ``names_of(path, shape)`` gives ``[(name, layer, transpose), ...]``,
    one name for a plain leaf, one per layer (``layer`` its index) for a stacked leaf;
    ``transpose``: ``False``, ``True`` (reversed axes: ``(out, in)`` weights) or the axes
    that take their layout to ours (``np.transpose(theirs, axes)``, e.g. ``(2, 3, 1, 0)``
    for OIHW convolutions). Returns ``{path: array}``; anything that does not fit raises
    one ``StateDictMismatch`` listing missing, unexpected, mis-shaped, non-finite and
    non-floating (integer, bool: never cast silently) entries."""
    expected = set()
    missing, mismatched, nonfinite, wrong_dtype = [], [], [], []
    out = {}
    for path, shape, dtype in leaves:
        names = names_of(path, shape)
        pieces = []
        for name, layer, transpose in names:
            expected.add(name)
            want = tuple(shape[1:] if layer is not None else shape)
            axes = (
                None
                if transpose is False
                else (tuple(reversed(range(len(want)))) if transpose is True else tuple(transpose))
            )
            want_theirs = want if axes is None else tuple(want[axes.index(i)] for i in range(len(want)))
            if name not in state_dict:
                missing.append(name)
                continue
            a = np.asarray(_to_numpy(state_dict[name]))
            if tuple(a.shape) != want_theirs:
                mismatched.append((name, tuple(a.shape), want_theirs))
                continue
            if not jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
                wrong_dtype.append((name, str(a.dtype)))
                continue
            if a.dtype == jax.numpy.bfloat16:
                a = a.astype(np.float32)
            if check_finite and not np.all(np.isfinite(a)):
                nonfinite.append(name)
            pieces.append(a if axes is None else np.transpose(a, axes))
        if len(pieces) == len(names):
            arr = np.stack(pieces) if names[0][1] is not None else pieces[0]
            out[path] = arr.astype(dtype)
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected or mismatched or nonfinite or wrong_dtype:
        raise StateDictMismatch(missing, unexpected, mismatched, nonfinite, wrong_dtype)
    return out


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def reference_buffers(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The deprecated buffers of the reference ``Model`` with the values it gives them
    (needed for a strict ``load_state_dict``)."""
    out: dict[str, np.ndarray] = {}
    pt = cfg.rope_seq_len
    out["var"] = np.ones((pt * pt, cfg.patch_dim), np.float32)
    n = pt * pt + cfg.txt_size
    for i, layers in enumerate(cfg.layers_per_block):
        if layers > 0:
            out[f"blocks.{i}.attn_mask"] = np.tril(np.ones((n, n), np.float32))
    if cfg.rope:
        rows = pt * pt + cfg.txt_size
        out["feat_rope.freqs_cos"] = np.zeros((rows, cfg.head_dim), np.float32)
        out["feat_rope.freqs_sin"] = np.zeros((rows, cfg.head_dim), np.float32)
    return out


def _load_problem(e: Exception) -> str:
    """A loader's error in one line: what is wrong, without ``torch.load``'s advice."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    problem = " ".join([s for s in lines if not s.startswith(advice)] or lines[:1])
    return problem.split(" Please ")[0] or type(e).__name__


def load_torch_file(path: str) -> dict[str, np.ndarray]:
    """Read a reference ``.pth`` state dict (torch needed) or a ``.safetensors`` file.

    ``.pth`` files are read with ``torch.load(weights_only=True)``, which runs no pickled
    code; a file it refuses, a corrupt file, or one holding anything but a mapping of
    names to tensors is a ``StateDictFileError`` naming the file."""
    path = str(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading .safetensors needs the 'safetensors' package") from e
        try:
            return dict(load_file(path))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error type, or a dtype NumPy lacks
            raise StateDictFileError(f"{path}: not a readable safetensors file: {_load_problem(e)}") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch; install starflow-jax[torch]") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file cannot be read
        raise StateDictFileError(
            f"{path}: torch.load(weights_only=True), which runs no pickled code, cannot read it: {_load_problem(e)}"
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise StateDictFileError(
            f"{path} holds a {type(sd).__name__}, not a state dict (a mapping of parameter names to tensors)"
        )
    return {k: _to_numpy(v) for k, v in sd.items()}


def load_reference_model(cfg: ModelConfig, source, *, report: list | None = None):
    """A ``StarFlow`` for ``cfg`` holding the weights of a reference state dict.

    ``source`` is a mapping of reference names to arrays (NumPy, JAX or torch tensors)
    or a path to a ``.pth`` / ``.safetensors`` file. No random initialisation happens:
    the model is built abstractly and filled."""
    if not isinstance(source, Mapping):
        source = load_torch_file(source)
    abstract = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, from_reference(state, source, report=report))
