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
