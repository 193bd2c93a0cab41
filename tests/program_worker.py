"""Run by tests/test_program.py in a fresh process with 8 simulated CPU devices: ``train``
runs one step of a config while the step's inputs and outputs are recorded, then ``plan``
builds the same config's program for the same 8 devices; prints both as a JSON REPORT."""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from starflow_jax.bench.plan import plan_program  # noqa: E402
from starflow_jax.config import load_config  # noqa: E402
from starflow_jax.train import program as P  # noqa: E402
from starflow_jax.train.loop import train  # noqa: E402


def describe(tree):
    """Every leaf's path, shape, dtype and sharding spec (over its mesh's axis sizes)."""
    out = {}
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sh = a.sharding
        spec = list(sh.spec) + [None] * (len(a.shape) - len(sh.spec))
        out[jax.tree_util.keystr(path)] = dict(
            shape=list(a.shape),
            dtype=str(a.dtype),
            mesh=dict(sh.mesh.shape),
            spec=[list(s) if isinstance(s, tuple) else s for s in spec],
        )
    return out


def main(config_path, overrides):
    config = load_config(config_path, overrides)
    seen = {}
    step = P.Program.step

    def spy(self, state, batch):
        if not seen:  # before the call: the state is donated to it
            seen["state"], seen["batch"] = describe(state), describe(batch)
        out = step(self, state, batch)
        seen.setdefault("new_state", describe(out[0]))
        return out

    P.Program.step = spy
    with tempfile.TemporaryDirectory() as wd:
        train(config, wd, log=lambda *a, **k: None, stop_after=1)
    program, batch = plan_program(config, jax.devices())
    with jax.set_mesh(program.mesh):
        compiled = program.lower(program.abstract_state, batch).compile()
    (state_in, batch_in), _ = compiled.input_shardings
    state_out, _ = compiled.output_shardings

    def with_shardings(structs, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), structs, shardings)

    planned = dict(
        state=describe(with_shardings(program.abstract_state, state_in)),
        batch=describe(with_shardings(batch, batch_in)),
        new_state=describe(with_shardings(program.abstract_state, state_out)),
    )
    print("REPORT " + json.dumps(dict(train=seen, plan=planned, devices=len(jax.devices()))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
