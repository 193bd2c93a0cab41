"""Every parameter of the flow model declares logical axes, and the one rules table
(``parallel.rules.LOGICAL_RULES``) maps them to the specs intended for each parameter's
role, checked on the abstract train states (nothing allocated) of the 3B and 7B configs."""

import dataclasses
import math
import pathlib

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from starflow_jax.config import load_config, model_config
from starflow_jax.parallel.rules import logical_axes, logical_spec, tree_specs
from starflow_jax.train.program import abstract_train_state, optimizer_for, step_settings

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
COLUMN = ("fsdp", "tensor")  # heads / MLP width on the output side
ROW = ("tensor", "fsdp")  # heads / MLP width on the input side
PROJECTION = ("fsdp", None)  # in / out of the transformer: FSDP on the input side only
NORMS = ("norm", "post_norm", "query_norm", "key_norm", "final_norm")
# the intended mesh axes of each parameter, by (owner, leaf name), written without the rules table
INTENDED = {
    **{(o, "kernel"): COLUMN for o in ("qkv", "fc1", "gate_proj", "up_proj")},
    **{(o, "bias"): ("tensor",) for o in ("qkv", "fc1", "gate_proj", "up_proj")},
    **{(o, "kernel"): ROW for o in ("proj", "fc2", "down_proj")},
    **{(o, "bias"): (None,) for o in ("proj", "fc2", "down_proj")},
    **{(o, "kernel"): PROJECTION for o in ("proj_in", "proj_out", "proj_txt")},
    **{(o, "bias"): (None,) for o in ("proj_in", "proj_out", "proj_txt")},
    **{(o, leaf): (None,) for o in NORMS for leaf in ("weight", "bias")},
    ("sos_embed", None): (None, None, None),
    ("pos_embed", None): (None, None),
}
BIG = 1 << 20  # elements: no leaf this large may stay fully replicated


def _names(path) -> list[str]:
    out = []
    for k in path:
        if isinstance(k, DictKey):
            out.append(str(k.key))
        elif isinstance(k, GetAttrKey):
            out.append(k.name)
        elif isinstance(k, SequenceKey):
            out.append(str(k.idx))
    return [n for n in out if n != "value"]


def _intended(names: list[str], shape: tuple[int, ...], mesh: dict) -> P | None:
    """The intended spec of a parameter-shaped leaf (None for other leaves: counters, keys)."""
    leaf = names[-1] if names[-1] in ("kernel", "bias", "weight") else None
    owner = names[-2] if leaf else names[-1]
    if (owner, leaf) not in INTENDED:
        return None
    stacked = "attn_blocks" in names
    axes = ((None,) if stacked else ()) + INTENDED[(owner, leaf)]
    assert len(axes) == len(shape), (names, shape)
    return P(*(a if a and mesh[a] > 1 and d % mesh[a] == 0 else None for a, d in zip(axes, shape)))


def _abstract_state(name: str):
    config = load_config(CONFIGS / f"{name}.py")
    _, tx = optimizer_for(config, model_config(config))
    hp = dataclasses.replace(step_settings(config, 0), ema_decay=0.999)  # EMA leaves too
    return abstract_train_state(config, tx, hp)[1]


@pytest.mark.parametrize("name", ["starflow_3b_t2i_256", "starflow_v_7b_t2v_480p"])
@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=64, tensor=2), dict(data=2, fsdp=16, tensor=4)])
def test_pod_state_specs_follow_parameter_roles(name, mesh):
    state = _abstract_state(name)
    specs = tree_specs(state, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(spec_leaves)
    checked = big = 0
    for (path, leaf), spec in zip(leaves, spec_leaves):
        names, shape = _names(path), tuple(leaf.shape)
        want = _intended(names, shape, mesh)
        if want is None:  # step, skipped, rng, optimizer counts: scalars and the key
            assert math.prod(shape) <= 2 and spec == P(*([None] * len(shape))), (names, shape, spec)
            continue
        assert spec == want, (names, shape, spec, want)
        checked += 1
        if math.prod(shape) > BIG:
            big += 1
            assert any(a is not None for a in spec), f"{names} {shape} is fully replicated"
    groups = ("params", "ema", "mu", "nu")
    assert checked == 4 * len(jax.tree.leaves(state.params)) and all(
        any(g in _names(p) for p, _ in leaves) for g in groups
    )
    assert big > 0


def test_logical_spec_splits_only_dividing_dimensions():
    mesh = dict(data=2, fsdp=4, tensor=2)
    assert logical_spec(("layers", "embed", "heads"), (3, 64, 192), mesh) == P(None, "fsdp", "tensor")
    assert logical_spec(("mlp", "embed"), (256, 6), mesh) == P("tensor", None)  # 6 not divisible by 4
    assert logical_spec(("embed", "features"), (64, 64), dict(data=8, fsdp=1, tensor=1)) == P(None, None)
    with pytest.raises(ValueError, match="'width' is not in"):
        logical_spec(("width",), (8,), mesh)


class _Undeclared(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jax.numpy.ones((4, 8)))
        self.kernel = nnx.Param(jax.numpy.ones((8, 8)), **logical_axes("embed", "mlp"))


def test_parameter_without_axes_is_an_error():
    state = nnx.state(nnx.eval_shape(_Undeclared), nnx.Param)
    with pytest.raises(ValueError, match=r"parameter scale \(4, 8\) declares no logical axes"):
        tree_specs(state, dict(data=1, fsdp=2, tensor=1))
    del state["scale"]
    assert tree_specs(state, dict(data=1, fsdp=2, tensor=2))["kernel"].get_value() == P("fsdp", "tensor")
