"""State dicts in general (any model's): reading a torch ``.pth`` or ``.safetensors``
file, tensors to NumPy, and gathering the arrays of a pytree's leaves from a state dict
of another naming, with one error listing everything that does not fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


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
            a = np.asarray(to_numpy(state_dict[name]))
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


def to_numpy(v) -> np.ndarray:
    """A NumPy array of a NumPy, JAX or torch array (torch bfloat16 as float32)."""
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


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
    return {k: to_numpy(v) for k, v in sd.items()}
