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


@pytest.mark.slow
def test_wordle_benchmark_reports_episode_throughput(tmp_path, capsys):
    """A one-step multi-turn run: 1 game x G=2 episodes of at most 2 turns; graft only (trl is dropped)."""
    out = tmp_path / "wordle.json"
    prompts, generations, steps, max_turns = 1, 2, 1, 2
    code = main(["--task", "wordle", "--frameworks", "graft,trl", "--rounds", "1", "--steps", str(steps),
                 "--warmup", "0", "--prompts-per-step", str(prompts), "--num-generations", str(generations),
                 "--max-new-tokens", "8", "--max-turns", str(max_turns), "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "wordle" and list(result["summary"]) == ["graft"]
    graft = result["summary"]["graft"]
    assert graft["episodes_per_s"] > 0 and graft["tokens_per_s"] > 0
    assert 1 <= graft["turns_per_episode"] <= max_turns
    assert graft["episodes"] == prompts * generations * steps
    assert graft["steps_measured"] == steps
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "dropping trl" in printed and "episodes/s" in printed
    assert "no min_new_tokens" in printed  # episodes end naturally
    assert "single-turn (graft vs TRL, completion tokens/s): graft bench --task arithmetic" in printed


def test_wordle_bench_refuses_trl_alone(capsys):
    assert main(["--task", "wordle", "--frameworks", "trl,trl-bf16"]) == 2
    assert "TRL has no multi-turn GRPO trainer" in capsys.readouterr().out
