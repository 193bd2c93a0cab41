"""Reference names both ways: exact round trips, expected shapes, deprecated buffers."""
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config.reference_args import from_model_kwargs
from starflow_jax.interop import reference_cases as rc
from starflow_jax.interop.state_dict import (expected_reference_shapes, from_reference, is_deprecated_buffer,
                                             reference_buffers, to_reference)
from starflow_jax.model import StarFlow

CASES = rc.discover()


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_round_trip_shapes_and_buffers(path):
    case = rc.load_case(path)
    cfg = from_model_kwargs(case.meta["model_kwargs"])
    _, abstract = nnx.split(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    params = {k: v for k, v in case.params().items() if not is_deprecated_buffer(k)}
    buffers = {k: v for k, v in case.params().items() if is_deprecated_buffer(k)}
    # expected names and shapes, from the abstract model alone
    assert expected_reference_shapes(abstract) == {k: v.shape for k, v in params.items()}
    # load, then map back: bit-exact, same key set
    back = to_reference(from_reference(abstract, case.params()))
    assert set(back) == set(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # the deprecated buffers we would write for the reference equal the case's
    ours = reference_buffers(cfg)
    assert set(ours) == set(buffers)
    for k, v in buffers.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
