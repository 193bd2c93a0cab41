"""How each flow block is inverted when sampling: a policy per block, deep block first.

Written as text (``--jacobi-blocks``, ``sample.jacobi_blocks``, what ``bench jacobi
--propose`` prints and saves), one entry per block separated by ``;``, each a policy
with optional ``key=value`` settings::

    adaptive,window=64,th=0.01,init=previous; blockwise,window=16,th=0.001; sequential

Policies: ``sequential`` (one pass per token), ``blockwise`` (the reference's chunks) and
``adaptive`` (``sampling.invert.jacobi``). Keys: ``window`` (tokens per chunk / window),
``th`` (threshold), ``max_iter`` (block-wise iteration cap), ``init`` (``noise``,
``zeros``, ``previous``). A key left out takes the sampling options' global value.
"""

from __future__ import annotations

import dataclasses

from starflow_jax.sampling.invert import JACOBI_INITS, JACOBI_POLICIES

POLICIES = ("sequential",) + JACOBI_POLICIES
_KEYS = {"window": int, "th": float, "max_iter": int, "init": str}


@dataclasses.dataclass(frozen=True)
class BlockPolicy:
    policy: str  # sequential | blockwise | adaptive
    window: int | None = None  # None: SamplingOptions.jacobi_block_size
    th: float | None = None  # None: SamplingOptions.jacobi_th
    max_iter: int | None = None  # None: SamplingOptions.jacobi_max_iter
    init: str | None = None  # None: SamplingOptions.jacobi_init

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"block policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"block policy window must be >= 1, got {self.window}")
        if self.th is not None and not self.th >= 0:
            raise ValueError(f"block policy th must be >= 0, got {self.th}")
        if self.max_iter is not None and self.max_iter < 1:
            raise ValueError(f"block policy max_iter must be >= 1, got {self.max_iter}")
        if self.init is not None and self.init not in JACOBI_INITS:
            raise ValueError(f"block policy init must be one of {', '.join(JACOBI_INITS)}, got {self.init!r}")

    def text(self) -> str:
        pairs = [(k, getattr(self, k)) for k in _KEYS if getattr(self, k) is not None]
        return ",".join([self.policy] + [f"{k}={v:g}" if k == "th" else f"{k}={v}" for k, v in pairs])


def parse(text: str) -> tuple[BlockPolicy, ...]:
    """``"adaptive,window=64,th=0.01; sequential"`` to policies, deep block first; ``""``: ``()``
    (every block by the global options)."""
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        policy, *pairs = (p.strip() for p in entry.split(","))
        kw = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise ValueError(f"block policy {entry!r}: {pair!r} is not key=value with a key of {', '.join(_KEYS)}")
            try:
                kw[key] = _KEYS[key](value.strip())
            except ValueError:
                raise ValueError(
                    f"block policy {entry!r}: {key}={value.strip()!r} is not a {_KEYS[key].__name__}"
                ) from None
        out.append(BlockPolicy(policy, **kw))
    return tuple(out)


def text(policies) -> str:
    return "; ".join(p.text() for p in policies)


def check_count(policies, num_blocks: int) -> None:
    if policies and len(policies) != num_blocks:
        raise ValueError(
            f"{len(policies)} block policies ({text(policies)!r}) for a model of {num_blocks} flow blocks: "
            "give one per block, deep block first"
        )
