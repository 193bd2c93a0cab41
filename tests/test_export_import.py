"""Checkpoints both ways: export to the reference's formats, import reference weights."""

import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_case

from starflow_jax.cli.main import main
from starflow_jax.config import load_config
from starflow_jax.interop import formats
from starflow_jax.interop import reference_cases as rc
from starflow_jax.workdir import params as workdir_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = rc.discover()


def _case_config_file(tmp_path, case):
    from conftest import write_case_config

    return write_case_config(tmp_path, case)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_import_export_round_trip_equals_the_case(path, tmp_path):
    """A case's state dict (safetensors) -> import -> export: exactly the case's keys,
    shapes and values, deprecated buffers included."""
    from safetensors.numpy import load_file, save_file

    case = rc.load_case(path)
    src = tmp_path / "case.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in case.params().items()}, str(src))
    cfg_file = _case_config_file(tmp_path, case)
    assert main(["import", "--torch", str(src), "--config", str(cfg_file), "--out", str(tmp_path / "wd")]) == 0
    out = tmp_path / "export.safetensors"
    assert main(["export", "--workdir", str(tmp_path / "wd"), "--format", "safetensors", "--out", str(out)]) == 0
    exported = load_file(str(out))
    assert set(exported) == set(case.params())
    for k, v in case.params().items():
        assert exported[k].shape == v.shape and np.array_equal(exported[k], v), k
    yaml_args = out.with_suffix(".yaml").read_text()
    assert "arguments:" in yaml_args and f"channels: {case.meta['model_kwargs']['channels']}" in yaml_args


def test_export_refuses_to_overwrite_and_import_refuses_another_architecture(tmp_path, capsys):
    from safetensors.numpy import save_file

    case = reference_case("t2i_small")
    src = tmp_path / "case.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in case.params().items()}, str(src))
    cfg_file = _case_config_file(tmp_path, case)
    assert main(["import", "--torch", str(src), "--config", str(cfg_file), "--out", str(tmp_path / "wd")]) == 0
    # the workdir exists: no silent overwrite
    assert main(["import", "--torch", str(src), "--config", str(cfg_file), "--out", str(tmp_path / "wd")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    out = tmp_path / "e.safetensors"
    out.write_text("precious")
    assert main(["export", "--workdir", str(tmp_path / "wd"), "--format", "safetensors", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "precious"
    # another architecture: the mismatch is listed
    assert (
        main(
            [
                "import",
                "--torch",
                str(src),
                "--config",
                str(cfg_file),
                "--set",
                "model.channels=96",
                "--out",
                str(tmp_path / "wd2"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "mis-shaped keys" in err and "blocks.0.proj_in.weight" in err


@pytest.mark.slow
def test_training_checkpoint_exports_and_imports_exactly(tmp_path):

    from starflow_jax.train.loop import train

    fast = [
        "model.channels=32",
        "train.batch_size=16",
        "train.steps=3",
        "train.eval_every=0",
        "train.checkpoint_every=3",
        "sample.per_class=1",
        "sample.scale=1",
        "eval.num_samples=0",
    ]
    train(load_config(ROOT / "configs" / "tiny_cpu.py", fast), str(tmp_path / "run"), log=lambda *a: None)
    out = tmp_path / "run.safetensors"
    assert main(["export", "--workdir", str(tmp_path / "run"), "--format", "safetensors", "--out", str(out)]) == 0
    assert (
        main(
            [
                "import",
                "--torch",
                str(out),
                "--config",
                str(ROOT / "configs" / "tiny_cpu.py"),
                *sum((["--set", o] for o in fast), []),
                "--out",
                str(tmp_path / "imp"),
            ]
        )
        == 0
    )
    _, _, p_run = workdir_params.load_params(tmp_path / "run")
    _, _, p_imp = workdir_params.load_params(tmp_path / "imp")
    import jax

    for a, b in zip(jax.tree.leaves(p_run), jax.tree.leaves(p_imp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pth_import_reproduces_the_forward(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[torch]')")
    case = reference_case("video_small")
    src = tmp_path / "case.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in case.params().items()}, src)
    assert (
        main(
            [
                "import",
                "--torch",
                str(src),
                "--config",
                str(_case_config_file(tmp_path, case)),
                "--out",
                str(tmp_path / "wd"),
            ]
        )
        == 0
    )
    _, model = workdir_params.model_from_workdir(tmp_path / "wd")
    out = model(jnp.asarray(case.arrays["input/x"]), jnp.asarray(case.arrays["input/y"]))
    assert rc.relative_error(out.z, case.arrays["forward/z"]) < 1e-4
    # and back to .pth, bfloat16 on request
    pth = tmp_path / "out.pth"
    assert (
        main(
            ["export", "--workdir", str(tmp_path / "wd"), "--format", "torch", "--dtype", "bfloat16", "--out", str(pth)]
        )
        == 0
    )
    sd = torch.load(pth, weights_only=True)
    assert set(sd) == set(case.params()) and all(v.dtype == torch.bfloat16 for v in sd.values())


REFERENCE_REPO = os.environ.get("STARFLOW_REFERENCE_REPO")


@pytest.mark.skipif(
    not REFERENCE_REPO,
    reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout to load the exported .pth into",
)
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_exported_pth_loads_strictly_into_the_reference(path, tmp_path):
    pytest.importorskip("torch")
    from starflow_jax.bench.reference import import_reference, reference_loss

    case = rc.load_case(path)
    model, _ = rc.build_model(case)
    from flax import nnx

    arrays = formats.export_arrays(model.cfg, nnx.state(model, nnx.Param))
    pth = tmp_path / "exported.pth"
    formats.write_torch(pth, arrays, "float32")
    tf = import_reference(REFERENCE_REPO)
    y = case.arrays["input/y"] if model.cfg.txt_dim > 0 else None
    ref = float(np.mean(reference_loss(tf, model.cfg, str(pth), case.arrays["input/x"], y)))
    ours = float(model.loss(jnp.asarray(case.arrays["input/x"]), None if y is None else jnp.asarray(y)))
    expected = float(case.arrays["forward/loss"])
    print(f"\n[{case.name}] reference loss {ref:.8f}, ours {ours:.8f}, case {expected:.8f}")
    assert abs(ref - ours) <= 1e-4 * abs(expected) and abs(ref - expected) <= 1e-4 * abs(expected)


def test_export_holds_one_copy_of_the_parameters(tmp_path):
    """Export converts and writes leaf by leaf, freeing each device array once copied: the
    host memory it allocates peaks near one copy of the parameters, not two."""
    pytest.importorskip("torch")
    import tracemalloc

    import jax
    from flax import nnx

    from starflow_jax.config import load_config, model_config
    from starflow_jax.model import StarFlow

    config = load_config(ROOT / "configs" / "tiny_cpu.py", ["model.channels=256"])
    params = nnx.state(StarFlow(model_config(config), rngs=nnx.Rngs(0)), nnx.Param)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(params))
    tracemalloc.start()
    arrays = formats.export_arrays(model_config(config), params, "float32", release=True)
    formats.write_torch(tmp_path / "m.pth", arrays, "float32")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(a.is_deleted() for a in jax.tree.leaves(params))
    assert peak < 1.5 * nbytes, (peak, nbytes)
