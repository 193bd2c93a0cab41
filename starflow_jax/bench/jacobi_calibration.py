"""Choosing a sampling policy per flow block under an error budget (``bench jacobi
--propose``), and saving the choice into a workdir's config.

Each block is measured alone: the block under a candidate policy, every other block
decoded sequentially (exactly), so a candidate's error is that of the final samples
against sequential decoding of the same noise. Errors of several blocks add roughly in
quadrature, so the proposal is the combination with the fewest passes whose root sum of
squared errors is within the budget; it is then run as a whole, and if its measured error
exceeds the budget, the choice is made again with the estimate scaled by the excess.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence

from starflow_jax import storage
from starflow_jax.sampling import block_policies
from starflow_jax.sampling.block_policies import BlockPolicy
from starflow_jax.workdir.layout import CONFIG, CONFIG_HISTORY, config_json, read_workdir_config

SEQUENTIAL = BlockPolicy("sequential")


@dataclasses.dataclass(frozen=True)
class Measured:
    policy: BlockPolicy
    passes: int  # this block's passes
    error: float  # relative RMS error of the samples (the other blocks exact)


def choose(per_block: Sequence[Sequence[Measured]], budget: float) -> tuple[Measured, ...] | None:
    """The combination (one candidate per block) with the fewest passes whose root sum of
    squared errors is at most ``budget`` (ties: the smaller error); ``None`` if none is."""
    # keep, per block, only candidates not beaten on both passes and error
    fronts = []
    for cands in per_block:
        front = []
        for m in sorted(cands, key=lambda m: (m.passes, m.error)):
            if not front or m.error < front[-1].error:
                front.append(m)
        fronts.append(front)
    best, best_key = None, None
    for combo in itertools.product(*fronts):
        err = sum(m.error**2 for m in combo) ** 0.5
        if err > budget:
            continue
        key = (sum(m.passes for m in combo), err)
        if best_key is None or key < best_key:
            best, best_key = combo, key
    return best


def propose(
    per_block: Sequence[Sequence[Measured]],
    budget: float,
    run: Callable[[tuple[BlockPolicy, ...]], tuple[list[int], float]],
    tries: int = 4,
) -> tuple[tuple[BlockPolicy, ...], list[int], float] | None:
    """The proposal whose whole run (``run(policies) -> (passes per block, error)``) is
    within ``budget``: ``(policies, passes, error)``, or ``None`` when no combination is."""
    target = budget
    for _ in range(tries):
        combo = choose(per_block, target)
        if combo is None:
            return None
        policies = tuple(m.policy for m in combo)
        passes, err = run(policies)
        if err <= budget:
            return policies, passes, err
        # the estimate was short by err / estimate: ask for an estimate that much smaller
        estimate = sum(m.error**2 for m in combo) ** 0.5
        target = min(budget * estimate / err, estimate) * 0.999
    return None


def save_proposal(workdir, policies: tuple[BlockPolicy, ...], note: dict) -> str:
    """Write ``sample.jacobi_blocks`` into ``workdir``'s ``config.json`` (what ``sample``,
    ``eval`` and the training previews then use); the config it replaces is appended to
    ``config_history.jsonl`` with ``note`` (nothing is lost). Returns the saved text."""
    workdir = storage.as_path(workdir)
    config = read_workdir_config(workdir)
    old = json.loads((workdir / CONFIG).read_text())
    text = block_policies.text(policies)
    block_policies.check_count(policies, int(config.model.num_blocks))
    config.sample.jacobi_blocks = text
    storage.append_text(
        workdir / CONFIG_HISTORY,
        json.dumps(dict(replaced=time.strftime("%Y-%m-%dT%H:%M:%S"), by="bench jacobi --save", **note, config=old))
        + "\n",
    )
    storage.replace_text(workdir / CONFIG, config_json(config))
    return text
