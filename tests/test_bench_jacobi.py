"""``bench jacobi``: the rows of each policy on a model, the adaptive policy's passes never
above sequential decoding's, its error 0 at threshold 0."""

import json

from fast_run import FAST, TINY

from starflow_jax.cli.main import main


def test_bench_jacobi_rows(tmp_path, capsys):
    out = tmp_path / "j.json"
    args = ["bench", "jacobi", "--config", str(TINY), "--random-init", "--num", "4", "--cfg", "0,1.5"]
    args += ["--windows", "4,16", "--thresholds", "0,1e-2", "--inits", "noise,zeros", "--json", str(out)]
    assert main(args + sum((["--set", o] for o in FAST), [])) == 0
    printed = capsys.readouterr().out
    assert "vs blockwise" in printed and "adaptive" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * (1 + 1 + 2 * 2 * 2)  # per guidance: sequential, blockwise, adaptive grid
    for g in (0.0, 1.5):
        mine = [r for r in rows if r["guidance"] == g]
        seq = json.loads(mine[0]["passes_per_block"])
        assert mine[0]["policy"] == "sequential" and mine[1]["policy"] == "blockwise"
        for r in mine[2:]:
            assert all(a <= s for a, s in zip(json.loads(r["passes_per_block"]), seq)), r
            if r["jacobi_th"] == 0:
                assert r["rel_rms_vs_sequential"] < 1e-5, r


def test_bench_jacobi_proposes_per_block_and_saves_it(tmp_path, capsys):
    """--propose measures each block alone and proposes one policy per block within the
    error budget; --save writes it into the workdir's config (the old one kept in
    config_history.jsonl), and `sample` then samples with it."""
    from starflow_jax.config import load_config
    from starflow_jax.train.loop import train
    from starflow_jax.workdir.layout import read_workdir_config

    work = tmp_path / "run"
    train(load_config(TINY, FAST), work, log=lambda *_: None)
    out = tmp_path / "p.json"
    args = ["bench", "jacobi", "--workdir", str(work), "--num", "4", "--cfg", "0", "--windows", "16"]
    args += ["--thresholds", "0,1e-2,10", "--inits", "noise", "--propose", "--budget", "1e-2", "--save"]
    assert main(args + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    (proposal,) = result["proposals"]
    assert proposal["error"] <= 1e-2 and len(proposal["passes"]) == 3
    seq = json.loads(result["rows"][0]["passes_per_block"])
    assert all(a <= s for a, s in zip(proposal["passes"], seq))
    assert f'--jacobi-blocks "{proposal["jacobi_blocks"]}"' in printed
    assert read_workdir_config(work).sample.jacobi_blocks == proposal["jacobi_blocks"]
    assert (work / "config_history.jsonl").exists()
    # sample uses the saved policies (and says so)
    png = tmp_path / "s.png"
    assert main(["sample", "--workdir", str(work), "--labels", "1,2", "--num", "2", "--out", str(png)]) == 0
    assert "sample.jacobi_blocks" in capsys.readouterr().out and png.exists()


def test_bench_jacobi_save_needs_one_guidance_and_a_proposal(capsys):
    base = ["bench", "jacobi", "--config", str(TINY), "--random-init"]
    for extra, match in [
        (["--save"], "--save writes the proposal of --propose"),
        (["--propose", "--save"], "--workdir"),
        (["--propose", "--save", "--cfg", "0,1"], "one guidance weight"),
    ]:
        assert main(base + extra) == 2, f"{extra} was accepted"
        assert match in capsys.readouterr().err
