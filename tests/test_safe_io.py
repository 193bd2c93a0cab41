"""Files in and out, safely (issue #21): an import that fails leaves the workdir as it was,
outputs are checked before any work and never overwritten without --overwrite, inputs that
would give a silently different model are refused, and bad files get one clear line."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from starflow_jax.cli import model_source
from starflow_jax.cli.main import main
from starflow_jax.config import ConfigError, ModelConfig, load_config, model_config
from starflow_jax.config.reference_args import TRAIN_ARGUMENTS, check_train_arguments
from starflow_jax.interop import formats
from starflow_jax.interop.named_tensors import StateDictMismatch
from starflow_jax.interop.state_dict import from_reference, to_reference
from starflow_jax.model import StarFlow
from starflow_jax.workdir import params as workdir_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CPU = str(ROOT / "configs" / "tiny_cpu.py")
# unconditional, so that the data alone is the model's input
TINY = dict(
    in_channels=3,
    img_size=8,
    patch_size=2,
    channels=32,
    num_blocks=2,
    layers_per_block=[1, 1],
    head_dim=32,
    rope=True,
    sos=True,
    use_softplus=True,
)
MISSING = "blocks.1.attn_blocks.0.mlp.main.0.weight"


def state_dict(value: float = 0.0) -> dict[str, np.ndarray]:
    """A reference state dict of the TINY model, every parameter ``value`` (built abstractly)."""
    abstract = nnx.state(nnx.eval_shape(lambda: StarFlow(ModelConfig(**TINY), rngs=nnx.Rngs(0))), nnx.Param)
    return to_reference(jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), abstract))


@pytest.fixture
def files(tmp_path):
    """The TINY config (reference Model kwargs) and its state dict as safetensors."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    weights = tmp_path / "tiny.safetensors"
    save_file(state_dict(), str(weights))
    return cfg, weights


def snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (directories: ``None``)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def one_line_error(capsys, command: str, *words: str) -> str:
    """The CLI's error: one line ``starflow-jax COMMAND: error: ...`` naming ``words``, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"starflow-jax {command}: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def boom(*args, **kwargs):
    raise AssertionError("the command did work before checking its arguments")


# ------------------------------------------------------------------ 1: import --overwrite
def _imported_workdir(tmp_path, files):
    cfg, weights = files
    wd = tmp_path / "wd"
    assert main(["import", "--torch", str(weights), "--config", str(cfg), "--out", str(wd)]) == 0
    (wd / "notes.txt").write_text("the user's own file")
    return wd


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-list"])
def test_failed_import_overwrite_leaves_the_workdir_as_it_was(tmp_path, files, capsys, fmt):
    wd = _imported_workdir(tmp_path, files)
    sd = state_dict(1.0)
    del sd[MISSING]
    bad = tmp_path / f"bad.{fmt.split('-')[0]}"
    if fmt == "safetensors":
        save_file(sd, str(bad))
    else:
        torch = pytest.importorskip("torch")
        torch.save([torch.zeros(2)] if fmt == "pth-list" else {k: torch.from_numpy(v) for k, v in sd.items()}, bad)
    before = snapshot(tmp_path)
    assert main(["import", "--torch", str(bad), "--config", str(files[0]), "--out", str(wd), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert (MISSING in err) if fmt != "pth-list" else ("holds a list, not a state dict" in err)
    assert snapshot(tmp_path) == before  # byte-identical, the user's file kept, no staging directory left


def test_import_overwrite_replaces_only_what_a_workdir_holds(tmp_path, files):
    wd = _imported_workdir(tmp_path, files)
    (wd / "checkpoints").mkdir()  # a training run's leftovers: a workdir's own, replaced
    (wd / "metrics.jsonl").write_text("{}\n")
    (wd / "samples_0000010.png").write_bytes(b"png")
    new = tmp_path / "new.safetensors"
    save_file(state_dict(0.5), str(new))
    assert main(["import", "--torch", str(new), "--config", str(files[0]), "--out", str(wd), "--overwrite"]) == 0
    assert sorted(p.name for p in wd.iterdir()) == ["config.json", "notes.txt", "params", "params.integrity.json"]
    assert (wd / "notes.txt").read_text() == "the user's own file"
    _, _, params = workdir_params.load_params(wd)
    assert all(np.all(np.asarray(a) == 0.5) for a in jax.tree.leaves(params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.safetensors", "tiny.json", "tiny.safetensors", "wd"]


def test_import_that_fails_while_moving_in_puts_the_old_workdir_back(tmp_path, files, monkeypatch, capsys):
    wd = _imported_workdir(tmp_path, files)
    before = snapshot(tmp_path)
    replace, failed = os.replace, []

    def full_disk(src, dst):  # moving the new params in fails (once: moving the old ones back works)
        if pathlib.Path(dst) == wd.resolve() / "params" and not failed:
            failed.append(src)
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(workdir_params.os, "replace", full_disk)
    assert main(["import", "--torch", str(files[1]), "--config", str(files[0]), "--out", str(wd), "--overwrite"]) == 2
    one_line_error(capsys, "import", "cannot write the workdir", "No space left on device")
    assert failed and snapshot(tmp_path) == before


def test_import_into_a_new_directory_and_refusals(tmp_path, files, capsys):
    cfg, weights = files
    out = tmp_path / "a" / "b" / "wd"
    assert main(["import", "--torch", str(weights), "--config", str(cfg), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params", "params.integrity.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["wd"]
    assert main(["import", "--torch", str(weights), "--config", str(cfg), "--out", str(out)]) == 2
    one_line_error(capsys, "import", "not empty; pass --overwrite")
    (tmp_path / "file").write_text("x")
    assert main(["import", "--torch", str(weights), "--config", str(cfg), "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "import", "is not a directory")


# ------------------------------------------------------------------ 9: export's .yaml
def test_export_checks_every_output_before_any_work(tmp_path, files, capsys, monkeypatch):
    wd = _imported_workdir(tmp_path, files)
    out = tmp_path / "model.safetensors"
    out.with_suffix(".yaml").write_text("mine")
    export = ["export", "--workdir", str(wd), "--format", "safetensors", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(workdir_params, "load_params", boom)
        assert main(export) == 2
    one_line_error(capsys, "export", f"{out.with_suffix('.yaml')} exists; pass --overwrite")
    assert out.with_suffix(".yaml").read_text() == "mine" and not out.exists()
    assert main(export + ["--overwrite"]) == 0
    assert out.with_suffix(".yaml").read_text().startswith("# written by starflow-jax")
    assert main(["export", "--workdir", str(wd), "--format", "safetensors", "--out", str(tmp_path / "m.yaml")]) == 2
    one_line_error(capsys, "export", "cannot end in .yaml")


def test_a_failed_export_leaves_no_half_written_file(tmp_path, files, capsys, monkeypatch):
    wd = _imported_workdir(tmp_path, files)
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old")
    out.with_suffix(".yaml").write_text("old")

    real, calls = formats.to_yaml_arguments, []

    def fails_writing_the_yaml(cfg):  # the first call makes the metadata, the second the .yaml file
        calls.append(cfg)
        if len(calls) == 2:
            raise ValueError("disk trouble")
        return real(cfg)

    monkeypatch.setattr(formats, "to_yaml_arguments", fails_writing_the_yaml)
    before = snapshot(tmp_path)
    assert main(["export", "--workdir", str(wd), "--format", "safetensors", "--out", str(out), "--overwrite"]) == 2
    one_line_error(capsys, "export", "disk trouble")
    assert len(calls) == 2 and snapshot(tmp_path) == before  # the new tensors' temporary file is gone too


# ------------------------------------------------------------------ 10a: dtypes
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_non_floating_tensors_are_refused(dtype):
    sd = state_dict()
    key = "blocks.0.proj_in.weight"
    sd[key] = sd[key].astype(dtype)
    abstract = nnx.state(nnx.eval_shape(lambda: StarFlow(ModelConfig(**TINY), rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(StateDictMismatch, match=rf"not floating point \(1\): {key}: {np.dtype(dtype)}") as info:
        from_reference(abstract, sd)
    assert info.value.wrong_dtype == [(key, str(np.dtype(dtype)))] and not info.value.missing


@pytest.mark.parametrize("dtype", [np.float16, np.float64, jnp.bfloat16])
def test_floating_tensors_of_any_width_are_accepted(dtype):
    sd = {k: v.astype(dtype) for k, v in state_dict(0.5).items()}
    abstract = nnx.state(nnx.eval_shape(lambda: StarFlow(ModelConfig(**TINY), rngs=nnx.Rngs(0))), nnx.Param)
    loaded = from_reference(abstract, sd)
    assert all(a.dtype == jnp.float32 and np.all(np.asarray(a) == 0.5) for a in jax.tree.leaves(loaded))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_import_refuses_integer_tensors(tmp_path, files, capsys, fmt):
    sd = state_dict()
    sd["blocks.0.proj_in.bias"] = sd["blocks.0.proj_in.bias"].astype(np.int32)
    sd["blocks.1.proj_out.weight"] = sd["blocks.1.proj_out.weight"].astype(bool)
    src = tmp_path / f"int.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(src))
    else:
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    assert main(["import", "--torch", str(src), "--config", str(files[0]), "--out", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert "not floating point (2): blocks.0.proj_in.bias: int32, blocks.1.proj_out.weight: bool" in err
    assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------ 10b: reference YAML keys
# The keys of the reference's released configs/*.yaml (apple/ml-starflow).
RELEASED_YAML_KEYS = (
    "adaln batch_size blocks cfg channel_size channels cond_noise_level cond_top_only conditional_denoiser "
    "denoiser_window drop_image drop_label finetuned_vae fps_cond fsdp fsdp_text_encoder grad_clip grad_skip "
    "gradient_checkpoint gradient_checkpoint_mlp img_size latent_norm_regularization layers_per_block "
    "learnable_self_denoiser loss_scaling lr min_lr mix_aspect no_flip noise_std nvp patch_size pt_seq_len rope "
    "sample_freq secondary_batch_size secondary_img_size secondary_ratio seq_order shallow_block_local soft_clip "
    "sos temporal_causal text top_block_channels txt_size use_final_norm use_softplus vae vid_size wds"
).split()


def test_misspelt_yaml_key_is_an_error_with_a_suggestion(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("arguments:\n- img_size: 32\n- chanels: 64\n- layers_per_blok: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"typo.yaml: unknown reference train.py arguments: 'chanels' \(did you "
        r"mean 'channels'\?\), 'layers_per_blok' \(did you mean 'layers_per_block'",
    ):
        load_config(path)
    assert main(["info", "--config", str(path)]) == 2
    one_line_error(capsys, "info", "'chanels' (did you mean 'channels'?)")
    with pytest.raises(ConfigError, match=r"'zzz'$"):
        check_train_arguments({"zzz": 1})


def test_every_train_py_argument_and_the_test_fixtures_load(tmp_path):
    assert set(RELEASED_YAML_KEYS) <= TRAIN_ARGUMENTS and len(TRAIN_ARGUMENTS) == 89
    check_train_arguments({k: None for k in TRAIN_ARGUMENTS})
    from test_state_dict import STARFLOW_3B_YAML

    path = tmp_path / "fixture.yaml"
    path.write_text(
        STARFLOW_3B_YAML
        + "".join(
            f"- {k}: 1\n" for k in ("no_flip", "fsdp", "wds", "nvp", "adaln", "gradient_checkpoint", "sample_freq")
        )
    )
    assert model_config(load_config(path)).channels == 3072


# ------------------------------------------------------------------ 10c, 11, 12: nll
def _nll(files, data, *extra):
    cfg, weights = files
    return main(["nll", "--config", str(cfg), "--weights", str(weights), "--data", str(data), *extra])


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((2, 3, 4, 4), "image"),
        ((2, 1, 8, 8), "image"),
        ((2, 2, 3, 8, 8), "image"),
        ((0, 3, 8, 8), "image"),
        ((2, 3, 8), "image"),
        ((), "image"),
    ],
    ids=["size", "channels", "frames", "empty", "rank3", "0-d"],
)
def test_nll_refuses_data_of_another_shape_before_any_work(tmp_path, files, capsys, monkeypatch, shape, layout):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    monkeypatch.setattr(model_source, "load_model", boom)
    assert _nll(files, tmp_path / "x.npy") == 2
    one_line_error(capsys, "nll", f"has shape {shape}", f"the {layout} model reads (n, 3, 8, 8)")


def test_nll_output_is_checked_first_and_never_overwritten(tmp_path, files, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "res.json"
    out.write_text("mine")
    with monkeypatch.context() as m:
        m.setattr(model_source, "load_model", boom)
        assert _nll(files, tmp_path / "x.npy", "--json", str(out)) == 2
        one_line_error(capsys, "nll", f"{out} exists; pass --overwrite")
        (tmp_path / "file").write_text("x")
        assert _nll(files, tmp_path / "x.npy", "--json", str(tmp_path / "file" / "res.json")) == 2
        one_line_error(capsys, "nll", "is not a directory")
    assert out.read_text() == "mine"
    new = tmp_path / "missing" / "dir" / "res.json"
    assert _nll(files, tmp_path / "x.npy", "--json", str(new)) == 0
    assert json.loads(new.read_text())["examples"] == 2
    assert _nll(files, tmp_path / "x.npy", "--json", str(out), "--overwrite") == 0
    assert json.loads(out.read_text())["examples"] == 2


def test_nll_bad_files_get_one_line(tmp_path, files, capsys):
    (tmp_path / "x.npy").write_text("not numpy")
    assert _nll(files, tmp_path / "x.npy") == 2
    one_line_error(capsys, "nll", "--data", "not a readable .npy file")
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "c.npy", np.zeros(()))
    assert _nll(files, tmp_path / "x.npy", "--cond", str(tmp_path / "c.npy")) == 2
    one_line_error(capsys, "nll", "unconditional (txt_dim=0)")


# ------------------------------------------------------------------ 10d, 11: sample
def test_sample_refuses_frames_for_an_image_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_source, "load_model", boom)
    assert (
        main(
            [
                "sample",
                "--config",
                TINY_CPU,
                "--random-init",
                "--labels",
                "1",
                "--num-frames",
                "4",
                "--out",
                str(tmp_path / "x.gif"),
            ]
        )
        == 2
    )
    one_line_error(capsys, "sample", "--num-frames needs a video model", "temporal_causal=0")
    assert not (tmp_path / "x.gif").exists()


def test_a_video_config_is_a_video_model():
    for name, video in (("tiny_cpu.py", False), ("video_tiny_cpu.py", True), ("t2v_latents_tiny.py", True)):
        config = load_config(ROOT / "configs" / name)
        assert model_source.is_video_model(config, model_config(config)) is video, name
    config = load_config(ROOT / "configs" / "tiny_cpu.py")
    with config.unlocked():
        config.data.num_frames = 4  # an image architecture trained on clips
    assert model_source.is_video_model(config, model_config(config))


def test_sample_output_directory_is_made_and_checked_before_sampling(tmp_path, capsys, monkeypatch):
    args = ["sample", "--config", TINY_CPU, "--random-init", "--labels", "1", "--num", "1"]
    (tmp_path / "file").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(model_source, "load_model", boom)
        assert main(args + ["--out", str(tmp_path / "file" / "x.png")]) == 2
        one_line_error(capsys, "sample", "is not a directory")
        (tmp_path / "x.npy").write_bytes(b"mine")
        assert main(args + ["--out", str(tmp_path / "y.png"), "--save-npy", str(tmp_path / "x.npy")]) == 2
        one_line_error(capsys, "sample", f"{tmp_path / 'x.npy'} exists; pass --overwrite")
        (tmp_path / "d.png").mkdir()
        assert main(args + ["--out", str(tmp_path / "d.png")]) == 2
        one_line_error(capsys, "sample", "is a directory")
    assert (tmp_path / "x.npy").read_bytes() == b"mine"
    out = tmp_path / "some" / "missing" / "dir" / "x.png"
    assert main(args + ["--out", str(out)]) == 0
    assert out.exists()


# ------------------------------------------------------------------ 12: bad files, one line
def test_a_state_dict_that_is_a_list_gets_one_line(tmp_path, files, capsys):
    torch = pytest.importorskip("torch")
    src = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], src)
    assert main(["import", "--torch", str(src), "--config", str(files[0]), "--out", str(tmp_path / "wd")]) == 2
    one_line_error(capsys, "import", str(src), "holds a list, not a state dict")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    assert main(["nll", "--config", str(files[0]), "--weights", str(src), "--data", str(tmp_path / "x.npy")]) == 2
    one_line_error(capsys, "nll", str(src), "holds a list, not a state dict")


class _Payload:
    """A pickle that creates a file when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_malicious_pickle_is_refused_in_one_line(tmp_path, files, capsys):
    torch = pytest.importorskip("torch")
    src = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"blocks.0.proj_in.weight": _Payload(marker)}, src)
    assert main(["import", "--torch", str(src), "--config", str(files[0]), "--out", str(tmp_path / "wd")]) == 2
    one_line_error(
        capsys, "import", str(src), "torch.load(weights_only=True), which runs no pickled code", "GLOBAL", "open"
    )
    assert not marker.exists() and not (tmp_path / "wd").exists()
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    assert (
        main(
            ["import", "--torch", str(tmp_path / "junk.pth"), "--config", str(files[0]), "--out", str(tmp_path / "wd")]
        )
        == 2
    )
    one_line_error(capsys, "import", "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    assert (
        main(
            [
                "import",
                "--torch",
                str(tmp_path / "junk.safetensors"),
                "--config",
                str(files[0]),
                "--out",
                str(tmp_path / "wd"),
            ]
        )
        == 2
    )
    one_line_error(capsys, "import", "junk.safetensors: not a readable safetensors file")


def test_a_malformed_yaml_gets_one_line(tmp_path, files, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("arguments:\n- img_size: [32\n- channels: 64\n")
    assert main(["info", "--config", str(path)]) == 2
    one_line_error(capsys, "info", f"{path}: not valid YAML", "line 3")
    assert main(["import", "--torch", str(files[1]), "--config", str(path), "--out", str(tmp_path / "wd")]) == 2
    one_line_error(capsys, "import", "not valid YAML")


def test_npz_weights_are_checked(tmp_path, files, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    nll = ["nll", "--config", str(files[0]), "--data", str(tmp_path / "x.npy"), "--weights"]
    sd = state_dict()
    sd["blocks.0.proj_in.weight"] = sd["blocks.0.proj_in.weight"].astype(np.int32)
    np.savez(tmp_path / "int.npz", **sd)
    assert main(nll + [str(tmp_path / "int.npz")]) == 2
    assert "not floating point (1): blocks.0.proj_in.weight: int32" in capsys.readouterr().err
    with open(tmp_path / "one.npz", "wb") as f:
        np.save(f, np.zeros(3))
    assert main(nll + [str(tmp_path / "one.npz")]) == 2
    one_line_error(capsys, "nll", "one.npz holds one array, not named arrays")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04junk")
    assert main(nll + [str(tmp_path / "junk.npz")]) == 2
    one_line_error(capsys, "nll", "junk.npz: not a readable .npz file")
