"""benchmarks/learning.py's arithmetic: accuracy at a wall-clock mark, time to reach an accuracy, the table."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "learning", Path(__file__).resolve().parent.parent / "benchmarks" / "learning.py"
)
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)

GRAFT = [[0.0, 0.4], [60.0, 0.6], [120.0, 0.75], [300.0, 0.85], [600.0, 0.9]]
TRL = [[0.0, 0.4], [200.0, 0.5], [400.0, 0.6], [600.0, 0.7]]


def test_accuracy_at_a_mark_is_the_last_evaluation_before_it():
    assert learning.accuracy_at(GRAFT, 0) == 0.4
    assert learning.accuracy_at(GRAFT, 59.9) == 0.4
    assert learning.accuracy_at(GRAFT, 60.0) == 0.6
    assert learning.accuracy_at(GRAFT, 599.0) == 0.85


def test_time_to_an_accuracy():
    assert learning.time_to(GRAFT, 0.7) == 120.0  # the first evaluation at or above it
    assert learning.time_to(GRAFT, 0.6) == 60.0
    assert learning.time_to(TRL, 0.95) is None


def test_table_compares_at_marks_and_per_seed():
    runs = [
        {"framework": "graft", "seed": 1, "points": GRAFT, "steps": 200, "step_s": 3.0},
        {"framework": "trl", "seed": 1, "points": TRL, "steps": 60, "step_s": 10.0},
    ]
    table = learning.summarize(runs, minutes=10)
    rows = table.splitlines()
    # marks at 1, 2, 3.3, 5, 7.5 and 10 minutes
    assert rows[2].startswith("| graft | 0.600 (0.600-0.600) | 0.750 (0.750-0.750) | 0.750")
    assert rows[3].startswith("| trl | 0.400 (0.400-0.400) | 0.400 (0.400-0.400) | 0.500")
    # TRL's final 0.7 is first reached by graft's evaluation at 120 s = 0.2 of TRL's 600 s
    assert (
        "TRL ends at 0.700; graft reaches it at 2.0 min (0.20 of TRL's); graft at TRL's full budget: 0.900"
        in table
    )


def test_plot_writes_a_png(tmp_path):
    runs = [{"framework": "graft", "seed": s, "points": GRAFT, "steps": 1, "step_s": 1.0} for s in (1, 2)]
    learning.plot(runs, 10, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_trl_settings_read_json_values_and_keep_other_text():
    settings = learning.trl_settings(["learning_rate=1e-4", "report_to=tensorboard", "bf16=true", "top_k=-1"])
    assert settings == {"learning_rate": 1e-4, "report_to": "tensorboard", "bf16": True, "top_k": -1}
    assert learning.trl_settings(["lr_scheduler_type=cosine"]) == {"lr_scheduler_type": "cosine"}
    with pytest.raises(SystemExit, match="write key=value"):
        learning.trl_settings(["learning_rate"])


def test_alarms_count_each_time_one_starts_firing():
    rows = [
        {"step": 0, "eval/accuracy": 0.4},  # an evaluation row: no health keys
        {"step": 1, "health/no_signal": 0, "health/truncation": 1},
        {"step": 2, "health/no_signal": 1, "health/truncation": 1},  # truncation still firing: not again
        {"step": 3, "health/no_signal": 0, "health/truncation": 0},
        {"step": 4, "health/no_signal": 1, "health/truncation": 0},
    ]
    assert learning.alarms_raised(rows) == {"truncation": 1, "no_signal": 2}
