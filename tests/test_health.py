"""Each alarm on synthetic metric streams (fires when it should, stays quiet otherwise), and one real run."""

import json

import pytest

from graft.config import HealthConfig, load_config
from graft.health import ALARMS, HealthMonitor
from graft.training.loop import train

QUIET = {"truncated_fraction": 0.0, "zero_variance_group_fraction": 0.2, "entropy": 1.0,
         "completion_length/mean": 40.0, "accuracy": 0.3, "loss": 0.1, "nonfinite_skipped": 0}  # fmt: skip


def run_stream(stream, **cfg):
    monitor = HealthMonitor(HealthConfig(window=3, **cfg))
    fired = []
    for step, changes in enumerate(stream, 1):
        metrics = {**QUIET, "step": step, **changes}
        fired.append([a.name for a in monitor.check(metrics)])
    return fired, monitor, metrics


def test_quiet_run_raises_nothing():
    fired, monitor, metrics = run_stream([{}] * 12)
    assert fired == [[]] * 12 and not monitor.firing
    assert {k: v for k, v in metrics.items() if k.startswith("health/")} == {
        f"health/{a}": 0.0 for a in ALARMS
    }


def test_truncation_fires_once_while_it_lasts_then_clears():
    fired, monitor, metrics = run_stream(
        [{"truncated_fraction": 0.9}] * 4 + [{"truncated_fraction": 0.0}] * 4
    )
    assert fired[0] == ["truncation"] and fired[1:4] == [
        [],
        [],
        [],
    ]  # reported when it starts, not every step
    assert metrics["health/truncation"] == 0.0 and "truncation" not in monitor.firing


def test_no_signal_needs_a_full_window():
    fired, *_ = run_stream([{"zero_variance_group_fraction": 1.0}] * 3)
    assert fired == [[], [], ["no_signal"]]


def test_entropy_collapse():
    stream = [{"entropy": 1.0}] * 3 + [{"entropy": 0.5}] * 3 + [{"entropy": 0.05}] * 3
    fired, *_ = run_stream(stream)
    assert sum(fired, []) == ["entropy_collapse"]
    assert fired[-1] == ["entropy_collapse"] or fired[-2] == ["entropy_collapse"]


def test_a_length_change_that_comes_with_learning_raises_no_alarm():
    """Answers losing their padding while accuracy climbs is the task being learned, not length hacking; the
    same change with accuracy flat is the warning sign."""
    shorter_and_right = [{"completion_length/mean": 40.0, "accuracy": 0.3}] * 3 + [
        {"completion_length/mean": 12.0, "accuracy": 0.6}
    ] * 3
    fired, *_ = run_stream(shorter_and_right)
    assert "length_drift" not in sum(fired, [])
    shorter_only = [{**row, "accuracy": 0.3} for row in shorter_and_right]
    fired, *_ = run_stream(shorter_only)
    assert "length_drift" in sum(fired, [])


@pytest.mark.parametrize("end, fires", [(100.0, True), (15.0, True), (60.0, False)])
def test_length_drift_both_ways(end, fires):
    fired, *_ = run_stream([{"completion_length/mean": 40.0}] * 3 + [{"completion_length/mean": end}] * 3)
    assert ("length_drift" in sum(fired, [])) is fires


def test_kl_blowup():
    fired, _, metrics = run_stream([{"kl": 0.1}, {"kl": 0.2}, {"kl": 3.0}])
    assert fired == [[], [], ["kl_blowup"]] and metrics["health/kl_blowup"] == 1.0


def test_format_rising_while_correctness_is_flat():
    hacking = [{"reward/format/mean": 0.1 * i, "accuracy": 0.3} for i in range(8)]
    learning = [{"reward/format/mean": 0.1 * i, "accuracy": 0.3 + 0.1 * i} for i in range(8)]
    assert "format_hacking" in sum(run_stream(hacking)[0], [])
    assert "format_hacking" not in sum(run_stream(learning)[0], [])


def test_nonfinite():
    fired, *_ = run_stream([{}, {"nonfinite_skipped": 1, "loss": None}])
    assert fired == [[], ["nonfinite"]]


def test_alarm_messages_say_what_why_and_what_to_try():
    monitor = HealthMonitor(HealthConfig())
    (alarm,) = monitor.check({**QUIET, "truncated_fraction": 1.0})
    text = alarm.message()
    assert "100% of completions hit generation.max_new_tokens" in text
    assert "Try: raise generation.max_new_tokens" in text


def test_monitor_state_round_trips():
    _, monitor, _ = run_stream([{"truncated_fraction": 0.9}] * 2)
    again = HealthMonitor(HealthConfig(window=3))
    again.restore(json.loads(json.dumps(monitor.state())))
    assert again.history == monitor.history and again.firing == monitor.firing


def test_a_real_run_with_a_tiny_length_limit_raises_the_truncation_alarm(tiny_model_dir, tmp_path, capsys):
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", "task.num_train=20", "task.num_eval=2", "grpo.num_generations=2",
        "generation.max_new_tokens=2", "train.max_steps=2", "eval.at_start=false", f"logging.output_dir={tmp_path}",
        "logging.run_name=short", "logging.progress=lines", "gate.enabled=false",
    ])  # fmt: skip
    run = train(cfg)
    out = capsys.readouterr().out
    assert "health:" in out and "[truncation]" in out and "raise generation.max_new_tokens" in out
    steps = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert all(m["health/truncation"] == 1.0 for m in steps)
    assert all(m["entropy"] > 0 for m in steps)
