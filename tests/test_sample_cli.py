"""``starflow-jax sample``: pictures from a random tiny model and from reference weights."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from starflow_jax.cli.main import main
from starflow_jax.interop import reference_cases as rc
from starflow_jax.sampling import SamplingOptions, sample

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.py")


def test_sample_random_tiny_model_writes_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--config", TINY, "--random-init", "--labels", "0,1,2,3", "--num", "4",
                 "--cfg", "1.0", "--out", str(out), "--save-npy", str(tmp_path / "x.npy")]) == 0
    img = Image.open(out)
    # 2x2 grid of 8x8 single-channel images with 1-pixel padding
    assert img.size == (2 * 9 + 1, 2 * 9 + 1) and img.mode == "L"
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (4, 1, 8, 8) and np.all(np.isfinite(x))
    assert "wrote" in capsys.readouterr().out


def test_sample_from_reference_weights_matches_the_library(tmp_path):
    path = [p for p in rc.discover() if p.stem == "t2i_small"][0]
    case = rc.load_case(path)
    from conftest import write_case_config

    cfg_file = write_case_config(tmp_path, case)
    np.save(tmp_path / "y.npy", case.arrays["input/y"])
    out = tmp_path / "ref.png"
    assert main(["sample", "--config", str(cfg_file), "--weights", str(path), "--cond", str(tmp_path / "y.npy"),
                 "--num", "2", "--seed", "3", "--jacobi", "--jacobi-th", "1e-8", "--out", str(out),
                 "--save-npy", str(tmp_path / "x.npy")]) == 0
    assert Image.open(out).size == (2 * 9 + 1, 9 + 1)
    model, _ = rc.build_model(case)
    import jax
    noise = jax.random.normal(jax.random.key(3), (2, 4, 8, 8), jnp.float32)
    expected = sample(model, noise, jnp.asarray(case.arrays["input/y"]), SamplingOptions())
    assert rc.relative_error(np.load(tmp_path / "x.npy"), np.asarray(expected)) < 1e-4


@pytest.mark.parametrize("extra,message", [
    (["--out", "x.jpg"], "must end in .png or .gif"),
    (["--out", "x.png"], "give exactly one of --labels or --cond"),
    (["--out", "x.png", "--labels", "0,11"], "labels must lie in"),
    (["--out", "x.png", "--labels", "a,b"], "comma-separated integers"),
    (["--out", "x.png", "--labels", "1", "--cfg", "-1"], "--cfg must be >= 0"),
])
def test_sample_bad_arguments(extra, message, capsys, tmp_path):
    args = ["sample", "--config", TINY, "--random-init"] + extra
    args[args.index("--out") + 1] = str(tmp_path / args[args.index("--out") + 1])
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_sample_missing_weights(capsys, tmp_path):
    assert main(["sample", "--config", TINY, "--weights", str(tmp_path / "nope.pth"), "--labels", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
