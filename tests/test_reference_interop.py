"""Reference interop beyond the parity cases: the case format's failure modes,
reference kwargs round trips, .pth loading, rematerialisation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config.reference_args import from_model_kwargs, to_model_kwargs
from starflow_jax.flow.loss import nll_loss
from starflow_jax.interop import reference_cases as rc
from starflow_jax.interop.state_dict import load_reference_model, to_reference


def _case(name):
    from conftest import reference_case

    return reference_case(name)  # skipped, saying why, when the cases directory lacks it


def _write_case(path, case, ops):
    meta = dict(case.meta, ops=ops)
    np.savez(path, meta=json.dumps(meta), **case.arrays)
    return rc.load_case(path)


def test_unknown_op_kind_is_a_failure(tmp_path):
    case = _case("pixel_classcond")
    fake = _write_case(
        tmp_path / "fake.npz",
        case,
        [{"op": "teleport", "name": "teleport", "kwargs": {}, "inputs": [], "outputs": ["teleport/x"]}],
    )
    with pytest.raises(KeyError, match="unknown op kind 'teleport'"):
        rc.evaluate_op(fake, fake.ops[0])


def test_unknown_output_key_is_a_failure(tmp_path):
    case = _case("pixel_classcond")
    op = dict(case.op("forward"))
    op["outputs"] = list(op["outputs"]) + ["forward/entropy"]
    fake = _write_case(tmp_path / "fake.npz", case, [op])
    with pytest.raises(KeyError, match="'entropy'"):
        rc.evaluate_op(fake, fake.ops[0])


def test_wrong_numbers_fail_the_comparison(tmp_path):
    case = _case("pixel_classcond")
    arrays = dict(case.arrays)
    arrays["forward/z"] = arrays["forward/z"] * 1.01
    bad = rc.Case(case.path, case.meta, arrays)
    res = {r.key: r for r in rc.evaluate_op(bad, bad.op("forward"))}
    assert not res["forward/z"].ok and res["forward/loss"].ok


def test_model_kwargs_round_trip():
    for name in ("t2i_small", "video_small", "gemma_style_top", "pixel_classcond"):
        kwargs = _case(name).meta["model_kwargs"]
        cfg = from_model_kwargs(kwargs)
        assert from_model_kwargs(to_model_kwargs(cfg)) == cfg


def test_rematerialised_stack_gives_the_same_gradients():
    case = _case("t2i_small")
    model, _ = rc.build_model(case)
    graphdef, state = nnx.split(model)
    x, y = jnp.asarray(case.arrays["input/x"]), jnp.asarray(case.arrays["input/y"])

    def loss(state, remat):
        out = nnx.merge(graphdef, state)(x, y, remat=remat)
        return nll_loss(out.z, out.logdets)

    g0 = jax.jit(jax.grad(lambda s: loss(s, False)))(state)
    g1 = jax.jit(jax.grad(lambda s: loss(s, True)))(state)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_pth_file_loads_and_reproduces_the_forward(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[torch]')")
    case = _case("t2i_small")
    path = tmp_path / "model.pth"
    torch.save({k: torch.from_numpy(v) for k, v in case.params().items()}, path)
    cfg = from_model_kwargs(case.meta["model_kwargs"])
    ignored = []
    model = load_reference_model(cfg, str(path), report=ignored)
    assert "var" in ignored and "feat_rope.freqs_cos" in ignored
    out = model(jnp.asarray(case.arrays["input/x"]), jnp.asarray(case.arrays["input/y"]))
    assert rc.relative_error(out.z, case.arrays["forward/z"]) < 1e-4
    exported = to_reference(nnx.state(model, nnx.Param))
    for k, v in exported.items():
        np.testing.assert_array_equal(v, case.params()[k])
