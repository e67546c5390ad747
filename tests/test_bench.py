import argparse
import json

import pytest

from graft.bench import main, step_gflop


@pytest.mark.slow
def test_benchmark_runs_graft_side_and_reports(tmp_path, capsys):
    """A one-step smoke run of the benchmark driver (the TRL side needs the `bench` extra and minutes)."""
    out = tmp_path / "bench.json"
    code = main(["--frameworks", "graft,graft-unpacked", "--rounds", "1", "--steps", "1", "--warmup", "0",
                 "--max-new-tokens", "4", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    graft = result["summary"]["graft"]
    assert graft["steps_measured"] == 1
    assert graft["completion_tokens"] == 2 * 8 * 4  # forced length: every completion has exactly 4 tokens
    assert graft["tokens_per_s"] > 0 and graft["peak_rss_mb"] > 100
    assert 0 < graft["fraction_of_peak"] < 1
    # the bench's graft config trains the whole batch at once: the update replays the rollout's forward
    assert 0 < graft["executed_fraction_of_peak"] < graft["fraction_of_peak"]
    printed = capsys.readouterr().out
    assert "replays the rollout's forward" in printed
    # every figure names its machine; the ablation says what oneDNN packing buys on it
    assert result["machine"]["model"] in printed and result["machine"]["supported"]["packed_float32"] in (
        True,
        False,
    )
    assert result["summary"]["gain_over_graft-unpacked"] > 0 and "graft / graft-unpacked:" in printed


def test_unknown_bench_variant_is_named():
    assert main(["--frameworks", "graft,graft-fast"]) == 2


def test_replayed_step_counts_no_training_forward_through_the_layers():
    args = argparse.Namespace(prompts_per_step=2, num_generations=8, max_new_tokens=64)
    full, replayed = step_gflop(args, 40), step_gflop(args, 40, replayed=True)
    # SmolLM2-135M: ~0.21 GFLOP per token through the layers, ~0.057 through the 49k head; 2 x 40 prompt
    # tokens + 1024 completion tokens of layers' forward are skipped
    assert full - replayed == pytest.approx((2 * 40 + 16 * 64) * 0.212, rel=0.02)
