"""train.ema_decay: the average's update by hand, the swap that puts the live weights back exactly, and in
the loop: the live trajectory is untouched, evaluations and the final adapter read the average, and a
resumed run ends bit-identical to a straight one."""

import json

import pytest
import torch
from test_resume import (
    digit_share,
    final_weights,
    metrics,
    resume_config,
    same_final_weights,
    straight_and_resumed,
)

from graft.rewards import builtin
from graft.training.averaging import WeightAverage
from graft.training.loop import train


def test_the_average_moves_by_one_minus_decay_toward_the_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = WeightAverage([w], decay=0.75)
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 2.0]))
    ema.after_step()  # 0.75 * [1, -2] + 0.25 * [5, 2] = [2, -1]
    assert ema.average[0].tolist() == [2.0, -1.0]
    with torch.no_grad():
        w.copy_(torch.tensor([6.0, 3.0]))
    ema.after_step()  # 0.75 * [2, -1] + 0.25 * [6, 3] = [3, 0]
    assert ema.average[0].tolist() == [3.0, 0.0]


def test_swapped_in_shows_the_average_then_puts_the_live_weights_back_bit_for_bit():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    ema = WeightAverage([w], decay=0.9)
    with torch.no_grad():
        w.add_(torch.randn(4, 3) / 3)  # values whose sum with the average would not round-trip
    ema.after_step()
    live = w.detach().clone()
    with ema.swapped_in():
        assert torch.equal(w, ema.average[0]) and not torch.equal(w, live)
    assert torch.equal(w, live)
    with pytest.raises(RuntimeError), ema.swapped_in():  # put back on the way out of an error too
        raise RuntimeError("evaluation failed")
    assert torch.equal(w, live)


def test_off_keeps_nothing_and_changes_nothing():
    w = torch.nn.Parameter(torch.ones(2))
    ema = WeightAverage([w], decay=None)
    ema.after_step()
    with ema.swapped_in():
        assert torch.equal(w, torch.ones(2))
    assert ema.state() is None


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "digit_share", digit_share)


def step_rows(run_dir) -> list[dict]:
    """The training steps' metrics, without timings or the evaluations (which read the average)."""
    return [{k: v for k, v in r.items() if k != "eval/accuracy"} for r in metrics(run_dir) if "loss" in r]


def test_the_loop_trains_the_live_weights_and_saves_the_average(tiny_model_dir, tmp_path):
    plain = train(resume_config(tiny_model_dir, tmp_path, "plain"))
    frozen = train(resume_config(tiny_model_dir, tmp_path, "frozen", "train.ema_decay=0.999999"))
    assert step_rows(frozen) == step_rows(plain)  # the average never feeds back into training
    trained, averaged = final_weights(plain), final_weights(frozen)
    lora_b = [k for k in trained if "lora_B" in k]
    assert trained.keys() == averaged.keys() and lora_b
    assert all(trained[k].abs().max() > 0 for k in lora_b)
    # a decay of ~1 keeps the starting adapter, whose B matrices are zero: 8 steps move it by ~8e-6 of
    # the way to the trained weights
    assert all(averaged[k].abs().max() < 1e-4 * trained[k].abs().max() for k in lora_b)


def test_a_resumed_run_averages_on_and_ends_bit_identical(tiny_model_dir, tmp_path):
    straight, resumed = straight_and_resumed(tiny_model_dir, tmp_path, "train.ema_decay=0.6")
    assert step_rows(resumed) == step_rows(straight)
    assert same_final_weights(straight, resumed)
    evals = [json.loads((r / "eval.json").read_text()) for r in (straight, resumed)]
    assert evals[0]["after"]["accuracy"] == evals[1]["after"]["accuracy"]
