"""Reference parity cases: ``.npz`` files holding a small reference model's weights,
inputs and the outputs the PyTorch reference computed (format: ``tests/reference_cases/README.md``).

The repository carries its cases in ``tests/reference_cases`` (made by
``tests/reference_cases/generate.py`` from a checkout of the reference); ``$STARFLOW_REFERENCE_CASES``
points the tests and ``starflow-jax parity`` at another directory of cases instead.

``evaluate_op`` recomputes one op with this implementation; ``compare`` applies the
cases' tolerance: ``max|ours - expected| / max|expected| <= max(1e-4, 20 * ref32_err)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.config.reference_args import from_model_kwargs
from starflow_jax.flow.loss import nll_loss
from starflow_jax.interop.state_dict import load_reference_model, to_reference
from starflow_jax.model import StarFlow

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
# the cases this repository carries (absent when the package is installed without the checkout)
REPO_CASES = CHECKOUT / "tests" / "reference_cases"
# a second set of cases made elsewhere, beside the checkout when there is one: a cross-check
SHARED_CASES = CHECKOUT.parent / "shared" / "reference"
ENV_VAR = "STARFLOW_REFERENCE_CASES"
MIN_TOL = 1e-4
REF32_FACTOR = 20.0


def cases_dir() -> pathlib.Path:
    """``$STARFLOW_REFERENCE_CASES``, else the repository's ``tests/reference_cases``."""
    return pathlib.Path(os.environ.get(ENV_VAR) or REPO_CASES)


def discover(directory: str | os.PathLike | None = None) -> list[pathlib.Path]:
    d = pathlib.Path(directory) if directory is not None else cases_dir()
    return sorted(d.glob("*.npz"))


@dataclasses.dataclass
class Case:
    path: pathlib.Path
    meta: dict
    arrays: dict

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.stem)

    @property
    def ops(self) -> list[dict]:
        return self.meta["ops"]

    def op(self, name: str) -> dict:
        for op in self.ops:
            if op["name"] == name:
                return op
        raise KeyError(f"case {self.name} has no op named {name!r}")

    def params(self) -> dict[str, np.ndarray]:
        return {k[len("param/") :]: v for k, v in self.arrays.items() if k.startswith("param/")}

    def tolerance(self, key: str) -> float:
        return max(MIN_TOL, REF32_FACTOR * float(self.meta.get("ref32_err", {}).get(key, 0.0)))


def load_case(path: str | os.PathLike) -> Case:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    return Case(pathlib.Path(path), meta, arrays)


def build_model(case: Case, **overrides) -> tuple[StarFlow, list[str]]:
    """The case's model with the case's weights; also the deprecated buffers ignored."""
    cfg = from_model_kwargs(case.meta["model_kwargs"], **overrides)
    ignored: list[str] = []
    return load_reference_model(cfg, case.params(), report=ignored), ignored


def _forward(case: Case, model: StarFlow) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    x = jnp.asarray(case.arrays["input/x"])
    y = jnp.asarray(case.arrays["input/y"]) if model.cfg.txt_dim > 0 else None

    def loss_fn(state, x):
        out = nnx.merge(graphdef, state)(x, y)
        return nll_loss(out.z, out.logdets), out

    (loss, out), (g_state, g_x) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(state, x)
    res = {"z": out.z, "loss": loss, "grad_x": g_x}
    res.update({f"logdet/{i}": ld for i, ld in enumerate(out.logdets)})
    res.update({f"output/{i}": o for i, o in enumerate(out.outputs)})
    res.update({f"grad/{k}": v for k, v in to_reference(g_state).items()})
    return res


def _denoiser(case: Case, model: StarFlow) -> dict[str, np.ndarray]:
    x = jnp.asarray(case.arrays["input/x"])
    y = jnp.asarray(case.arrays["input/y"]) if model.cfg.txt_dim > 0 else None
    return {"out": nnx.jit(lambda m, x, y: m.denoise(x, y))(model, x, y)}


# ``annealed_guidance``: the reference computes an annealing ratio but its guidance rule uses the
# unscaled weight, so it does not change the samples (the cases' expected values show it); read
# and ignored
SAMPLING_KWARGS = {"guidance", "annealed_guidance", "attn_temp", "jacobi_block_size", "jacobi_th", "jacobi_max_iter"}


def _sampling(case: Case, model: StarFlow, op: dict) -> dict[str, np.ndarray]:
    from starflow_jax.sampling import SamplingOptions, sample

    kw = dict(op.get("kwargs", {}))
    unknown = sorted(set(kw) - SAMPLING_KWARGS)
    if unknown:
        raise KeyError(
            f"case {case.name}: op {op['name']!r} has sampling arguments this implementation does not know: {unknown}"
        )
    guidance = float(kw.get("guidance", 0.0))
    noise = jnp.asarray(case.arrays["input/noise"])
    y = None
    if model.cfg.txt_dim > 0:
        y = jnp.asarray(case.arrays["input/y"])
        if guidance > 0:
            y = jnp.concatenate([y, jnp.asarray(case.arrays["input/y_null"])], axis=0)
    opts = SamplingOptions(
        guidance=guidance,
        attn_temp=float(kw.get("attn_temp", 1.0)),
        jacobi=op["op"] == "jacobi",
        jacobi_block_size=int(kw.get("jacobi_block_size", 32)),
        jacobi_th=float(kw.get("jacobi_th", 1e-3)),
        jacobi_max_iter=int(kw.get("jacobi_max_iter", 32)),
    )
    return {"x": sample(model, noise, y, opts)}


EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "forward": lambda case, model, op: _forward(case, model),
    "denoiser": lambda case, model, op: _denoiser(case, model),
    "reverse": _sampling,
    "jacobi": _sampling,
}


@dataclasses.dataclass
class Comparison:
    key: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.err) and self.err <= self.tol)


def relative_error(ours, expected: np.ndarray) -> float:
    ours = np.asarray(jax.device_get(ours), np.float64)
    expected = np.asarray(expected, np.float64)
    if ours.size != expected.size:
        raise ValueError(f"output has {ours.size} elements, expected {expected.size} (shape {expected.shape})")
    ours = ours.reshape(expected.shape)
    return float(np.max(np.abs(ours - expected)) / max(float(np.max(np.abs(expected))), 1e-12))


def evaluate_op(case: Case, op: dict, model: StarFlow | None = None) -> list[Comparison]:
    """Recompute ``op`` and compare every listed output with the case's expectation.

    Raises ``KeyError`` for an op kind, sampling argument or output key this
    implementation does not know."""
    kind = op["op"]
    if kind not in EVALUATORS:
        raise KeyError(f"case {case.name}: unknown op kind {kind!r} (known: {sorted(EVALUATORS)})")
    if model is None:
        model, _ = build_model(case)
    ours = EVALUATORS[kind](case, model, op)
    prefix = op["name"] + "/"
    results = []
    for key in op["outputs"]:
        if not key.startswith(prefix):
            raise KeyError(f"case {case.name}: output {key!r} of op {op['name']!r} does not start with {prefix!r}")
        sub = key[len(prefix) :]
        if sub not in ours:
            raise KeyError(
                f"case {case.name}: op {op['name']!r} lists output {sub!r}, which this "
                f"implementation does not produce (it produces {sorted(ours)[:8]}...)"
            )
        results.append(Comparison(key, relative_error(ours[sub], case.arrays[key]), case.tolerance(key)))
    return results
