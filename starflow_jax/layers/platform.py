"""Which platform attention is traced for: the default backend, or the target of an
ahead-of-time compilation (``starflow-jax plan`` compiles for a TPU slice from a CPU host)."""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar("starflow_attention_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str):
    """Trace attention for ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``) instead of the
    default backend: ahead-of-time compilation for a TPU slice from a CPU host
    (``starflow-jax plan``) must pick the TPU kernels and compile them, not interpret them."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    return _TARGET.get() or jax.default_backend()
