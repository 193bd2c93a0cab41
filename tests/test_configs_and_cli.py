"""Config files, overrides and the ``starflow-jax`` CLI (info, parity)."""

import json
import pathlib

import pytest

from starflow_jax.cli.main import main
from starflow_jax.config import ConfigError, load_config, model_config
from starflow_jax.model.summary import parameter_counts

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Parameter counts of the reference's released models (sum of numel over
# transformer_flow.Model(...).parameters()).
STARFLOW_3B = dict(total=3_858_281_544, top=2_725_205_004, denoiser=0)
STARFLOW_V_7B = dict(total=6_890_096_528, top=4_842_107_024, denoiser=912_884_784)


@pytest.mark.parametrize(
    "name,expected", [("starflow_3b_t2i_256.py", STARFLOW_3B), ("starflow_v_7b_t2v_480p.py", STARFLOW_V_7B)]
)
def test_full_size_parameter_counts(name, expected):
    counts = parameter_counts(model_config(load_config(CONFIGS / name)))
    assert counts["total"] == expected["total"]
    assert counts["blocks"][-1]["params"] == expected["top"]
    assert counts["denoiser"] == expected["denoiser"]


@pytest.mark.parametrize(
    "name,expected", [("starflow_3b_t2i_256.py", STARFLOW_3B), ("starflow_v_7b_t2v_480p.py", STARFLOW_V_7B)]
)
def test_info_prints_counts(name, expected, capsys, tmp_path):
    out_json = tmp_path / "counts.json"
    assert main(["info", "--config", str(CONFIGS / name), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert f"total: {expected['total']:,}" in text
    assert f"{expected['top']:,}" in text
    data = json.loads(out_json.read_text())
    assert data["total"] == expected["total"]


def test_every_config_file_loads():
    files = sorted(CONFIGS.glob("*.py"))
    assert len(files) >= 3
    for f in files:
        if f.name.startswith("finetune_"):  # decoder fine-tuning: no flow model section
            from starflow_jax.cli.finetune_decoder import load_finetune_config

            assert load_finetune_config(str(f)).finetune.steps > 0
            continue
        cfg = model_config(load_config(f))
        assert cfg.num_blocks == len(cfg.layers_per_block)


def test_override_changes_value_and_unknown_key_fails():
    config = load_config(CONFIGS / "tiny_cpu.py", ["model.channels=96", "model.layers_per_block=[1, 0, 2]"])
    cfg = model_config(config)
    assert cfg.channels == 96 and cfg.layers_per_block == (1, 0, 2)
    with pytest.raises(ConfigError, match="no key 'model.chanels'"):
        load_config(CONFIGS / "tiny_cpu.py", ["model.chanels=96"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(CONFIGS / "tiny_cpu.py", ["model.channels"])


def test_override_with_inconsistent_value_fails():
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        load_config(CONFIGS / "tiny_cpu.py", ["model.img_size=9"])


def test_missing_config_file_is_an_error(capsys):
    assert main(["info", "--config", "configs/does_not_exist.py"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reference_yaml_config_through_the_cli(tmp_path, capsys):
    yaml_text = "\n".join(
        [
            "arguments:",
            "- img_size: 640",
            "- txt_size: 256",
            "- vid_size: '81:16'",
            "- channel_size: 48",
            "- patch_size: 1",
            "- channels: 3072",
            "- top_block_channels: 4096",
            "- blocks: 6",
            "- layers_per_block: 2 2 2 2 2 24",
            "- rope: 1",
            "- sos: 1",
            "- seq_order: L2R",
            "- pt_seq_len: 32",
            "- use_softplus: 1",
            "- cond_top_only: 1",
            "- use_final_norm: 1",
            "- learnable_self_denoiser: 1",
            "- conditional_denoiser: 1",
            "- denoiser_window: 10",
            "- temporal_causal: 2",
            "- shallow_block_local: 1",
            "- vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6",
            "- text: google/flan-t5-xl",
            "- soft_clip: 4",
            "",
        ]
    )
    path = tmp_path / "starflow-v.yaml"
    path.write_text(yaml_text)
    cfg = model_config(load_config(path))
    assert cfg.img_size == 40 and cfg.in_channels == 48 and cfg.txt_dim == 2048
    assert main(["info", "--config", str(path)]) == 0
    assert f"total: {STARFLOW_V_7B['total']:,}" in capsys.readouterr().out


@pytest.mark.slow
def test_parity_cli_on_one_case(tmp_path, capsys):

    from conftest import reference_case_path

    path = reference_case_path("pixel_classcond")
    (tmp_path / path.name).symlink_to(path)
    out_json = tmp_path / "parity.json"
    assert main(["parity", "--cases", str(tmp_path), "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    forward = [r for r in rows if r["op"] == "forward"]
    assert forward and forward[0]["status"] == "pass" and forward[0]["worst_err"] < 1e-4


def test_nll_cli_reproduces_the_reference_loss(tmp_path, capsys):
    import numpy as np
    from conftest import reference_case_path, write_case_config

    from starflow_jax.interop import reference_cases as rc

    path = reference_case_path("t2i_small")
    case = rc.load_case(path)

    cfg_file = write_case_config(tmp_path, case)
    np.save(tmp_path / "x.npy", case.arrays["input/x"])
    np.save(tmp_path / "y.npy", case.arrays["input/y"])
    out_json = tmp_path / "nll.json"
    assert (
        main(
            [
                "nll",
                "--config",
                str(cfg_file),
                "--weights",
                str(path),
                "--data",
                str(tmp_path / "x.npy"),
                "--cond",
                str(tmp_path / "y.npy"),
                "--batch-size",
                "1",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    res = json.loads(out_json.read_text())
    expected = float(case.arrays["forward/loss"])
    assert abs(res["nll"] - expected) <= 1e-4 * abs(expected)
    assert abs(res["bits_per_dim"] - (expected + 0.9189385332046727) / 0.6931471805599453) < 1e-3
    assert "bits per dim" in capsys.readouterr().out
    # a conditioned model without conditioning is a clear error
    assert main(["nll", "--config", str(cfg_file), "--weights", str(path), "--data", str(tmp_path / "x.npy")]) == 2
    assert "give --cond or --labels" in capsys.readouterr().err


def test_config_dot_flags_are_overrides(capsys):
    from starflow_jax.cli.main import config_flags_to_overrides

    assert config_flags_to_overrides(
        ["info", "--config", "c.py", "--config.model.channels=96", "--config.model.sos", "false"]
    ) == ["info", "--config", "c.py", "--set", "model.channels=96", "--set", "model.sos=false"]
    assert main(["info", "--config", str(CONFIGS / "tiny_cpu.py"), "--config.model.channels=32"]) == 0
    assert "total: 52,580" in capsys.readouterr().out  # the 32-wide model, not the 64-wide default
    assert main(["info", "--config", str(CONFIGS / "tiny_cpu.py"), "--config.model.widht=32"]) == 2
    assert "no key 'model.widht'" in capsys.readouterr().err


def test_every_schema_key_can_be_set_from_the_command_line():
    """Walk the data / train / sample / mesh schema: each key is accepted by --set on a
    training config and takes the value given."""
    from starflow_jax.config.training import SECTIONS

    def other(v):
        if isinstance(v, bool):
            return not v
        if isinstance(v, int):
            return v + 2
        if isinstance(v, float):
            return v / 2 if v else 0.5
        if isinstance(v, tuple):
            return tuple(x + 1 for x in v)
        return "x" + v

    def text(v):
        return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)

    for section, defaults in SECTIONS.items():
        for key, default in defaults.items():
            value = other(default)
            config = load_config(ROOT / "configs" / "tiny_cpu.py", [f"{section}.{key}={text(value)}"])
            got = config[section][key]
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, (section, key, got, value)
