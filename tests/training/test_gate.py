"""The gate probes in rounds: a reward that is zero on the first prompts' samples but not on later ones
lets the run start; one that stays zero up to gate.max_prompts stops it before GRPO, naming the count."""

import json

import pytest
from test_grpo import tiny_config

from graft.tasks import build_task
from graft.training.gate import GateError
from graft.training.loop import train

REWARD = """
def late(prompts, completions, **_):
    return [1.0 if {prompt!r} in str(p) else 0.0 for p in prompts]
"""


def late_reward(tmp_path, model_dir, index: int) -> str:
    """A reward that scores only the samples of training problem `index`, whatever they say."""
    prompt = build_task(tiny_config(model_dir, tmp_path).task).train[index].prompt
    path = tmp_path / "late.py"
    path.write_text(REWARD.format(prompt=prompt))
    return f"rewards.functions=[{path}:late]"


def gate_run(model_dir, tmp_path, *overrides):
    return tiny_config(model_dir, tmp_path, "gate.num_prompts=2", "train.max_steps=1", "eval.at_start=false",
                       "eval.at_end=false", "logging.run_name=gated", *overrides)  # fmt: skip


def test_the_gate_probes_more_prompts_before_it_refuses(tiny_model_dir, tmp_path):
    reward = late_reward(tmp_path, tiny_model_dir, 5)  # the third round's second problem
    run = train(gate_run(tiny_model_dir, tmp_path, reward, "gate.max_prompts=8"))
    gate = json.loads((run / "gate.json").read_text())
    assert gate["passed"] and gate["rewards"]["late"] == {"mean": 4 / 24, "nonzero": 4, "scored": 24}

    with pytest.raises(GateError, match=r"16 sampled completions \(4 training prompts x 4\) scored 0"):
        train(gate_run(tiny_model_dir, tmp_path, reward, "gate.max_prompts=4", "logging.run_name=refused"))
    gate = json.loads((tmp_path / "refused" / "gate.json").read_text())
    assert not gate["passed"] and gate["rewards"]["late"]["scored"] == 16
