import json

import pytest

from graft.bench import main


@pytest.mark.slow
def test_benchmark_runs_graft_side_and_reports(tmp_path, capsys):
    """A one-step smoke run of the benchmark driver (the TRL side needs the `bench` extra and minutes)."""
    out = tmp_path / "bench.json"
    code = main(["--frameworks", "graft", "--rounds", "1", "--steps", "1", "--warmup", "0",
                 "--max-new-tokens", "4", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    graft = result["summary"]["graft"]
    assert graft["steps_measured"] == 1
    assert graft["completion_tokens"] == 2 * 8 * 4  # forced length: every completion has exactly 4 tokens
    assert graft["tokens_per_s"] > 0 and graft["peak_rss_mb"] > 100
    assert 0 < graft["fraction_of_peak"] < 1
    assert "graft" in capsys.readouterr().out
