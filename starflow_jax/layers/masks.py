"""Attention masks as index rules, shared by every attention path (the splash kernel
evaluates the rule, the others materialise it)."""

from __future__ import annotations

import numpy as np


class IndexMask:
    """A boolean ``(q_len, k_len)`` attention mask given as a rule ``fn(q_ids, k_ids)`` over
    slot indices (broadcast ``(q, 1)`` and ``(1, k)`` integer arrays; arithmetic and
    comparisons only, so it evaluates on NumPy and on JAX arrays alike). The splash kernel
    evaluates the rule inside the kernel and over blocks when it builds its tables, so a
    long video's mask is never materialised; the other paths materialise it
    (``np.asarray(mask)``)."""

    ndim = 2

    def __init__(self, shape: tuple[int, int], fn, name: str = "mask"):
        self.shape, self.fn, self.name = (int(shape[0]), int(shape[1])), fn, name

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.fn(np.arange(self.shape[0])[:, None], np.arange(self.shape[1])[None, :]), bool)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"IndexMask({self.name}, {self.shape})"
