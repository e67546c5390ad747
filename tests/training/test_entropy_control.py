"""Entropy control in the loop: the bonus's weight follows the target step by step, is logged, and resumes
exactly (the bonus's gradient itself is checked by hand in tests/algo/test_entropy.py and through the
replayed update in tests/cpu/test_replay.py)."""

import pytest
from test_resume import digit_share, metrics, resume_config, same_final_weights, straight_and_resumed

from graft.rewards import builtin
from graft.training.loop import train


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "digit_share", digit_share)


def step_rows(run_dir) -> list[dict]:
    return [r for r in metrics(run_dir) if "entropy_coef" in r]


CONTROL = ("grpo.entropy_target=100", "grpo.entropy_coef_step=0.01", "grpo.entropy_coef_max=0.03")


def test_the_weight_rises_below_the_target_up_to_its_maximum(tiny_model_dir, tmp_path):
    run = train(resume_config(tiny_model_dir, tmp_path, "control", *CONTROL))
    steps = step_rows(run)
    assert all(r["entropy"] < 100 for r in steps)  # always below the target: up by a step each time
    assert [r["entropy_coef"] for r in steps] == pytest.approx(
        [0.0, 0.01, 0.02, 0.03, 0.03, 0.03, 0.03, 0.03]
    )


def test_the_weight_falls_back_above_the_target(tiny_model_dir, tmp_path):
    run = train(resume_config(tiny_model_dir, tmp_path, "above", "grpo.entropy_target=0.001",
                              "grpo.entropy_coef=0.02", "grpo.entropy_coef_step=0.01"))  # fmt: skip
    assert [r["entropy_coef"] for r in step_rows(run)] == pytest.approx([0.02, 0.01, 0, 0, 0, 0, 0, 0])


def test_a_resumed_run_keeps_the_weight_and_ends_bit_identical(tiny_model_dir, tmp_path):
    straight, resumed = straight_and_resumed(tiny_model_dir, tmp_path, *CONTROL)
    assert metrics(resumed) == metrics(straight)
    assert same_final_weights(straight, resumed)
