"""Multi-turn tasks in the training loop, on a tiny model and scripted environments: episodes are trained on
the sampled tokens only, an environment that breaks leaves its episode out of the baseline and the loss,
and a run trains, evaluates and logs its episodes."""

import json

import torch

from graft.batch import Rollout
from graft.config import load_config
from graft.training.grpo import micro_batch_logprobs
from graft.training.loop import train

ENV = '''
from graft.envs import Environment, StepResult


class Counting(Environment):
    """Two turns; breaks on rows with an even answer (so those groups' episodes fail)."""

    def reset(self, row):
        if int(row["answer"]) % 2 == 0:
            raise RuntimeError("this environment breaks on purpose")
        self.turns = 0
        return "Say a number."

    def step(self, reply):
        self.turns += 1
        return StepResult("Again.", done=self.turns == 2, info={"turns": self.turns})


def digit_turns(prompts, completions, **_):
    return [sum(any(ch.isdigit() for ch in m["content"]) for m in c if m["role"] == "assistant") for c in completions]
'''


def counting_config(model_dir, tmp_path, run_name: str, *overrides: str):
    """2 steps of 4 prompts x 2 episodes against Counting, scored by digit_turns (written to tmp_path)."""
    env_file = tmp_path / "counting.py"
    env_file.write_text(ENV)
    return load_config(
        None,
        [f"model.name={model_dir}", f"task.environment={env_file}:Counting",
         f"rewards.functions=[{env_file}:digit_turns]", "task.num_train=8", "task.num_eval=2",
         "grpo.num_generations=2", "generation.max_new_tokens=4", "episode.max_turns=3", "train.max_steps=2",
         "train.prompts_per_step=4", "train.learning_rate=0.01", "rewards.on_error=zero",
         f"logging.output_dir={tmp_path}", f"logging.run_name={run_name}", "logging.progress=lines",
         "logging.print_config=false", *overrides],
    )  # fmt: skip


def test_the_update_counts_the_sampled_tokens_only(tiny_model):
    # one row: 2 prompt tokens, then model, model, environment, environment, model
    loss_mask = torch.tensor([[1, 1, 0, 0, 1]])
    rollout = Rollout(
        prompt_ids=torch.tensor([[5, 6]]),
        prompt_mask=torch.ones(1, 2, dtype=torch.long),
        completion_ids=torch.tensor([[7, 8, 9, 10, 11]]),
        completion_mask=torch.ones(1, 5, dtype=torch.long),
        logprobs=torch.zeros(1, 5),
        truncated=torch.zeros(1, dtype=torch.bool),
        group_size=1,
        loss_mask=loss_mask,
    )
    cfg = load_config(None, [])
    _, mask = micro_batch_logprobs(tiny_model, rollout, torch.tensor([0]), cfg, torch.device("cpu"))
    assert mask.tolist() == loss_mask.tolist()


def test_a_multi_turn_run_trains_evaluates_and_leaves_broken_episodes_out(tiny_model_dir, tmp_path):
    cfg = counting_config(tiny_model_dir, tmp_path, "ep", "episode.env_timeout=5", "eval.at_start=true")
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["loss"] == r["loss"] for r in steps)  # finite: it trained
    assert all("episodes/turns" in r and "episodes/left_out" in r for r in steps)
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    broken = [c for c in completions if int(c["answer"]) % 2 == 0]
    played = [c for c in completions if int(c["answer"]) % 2]
    assert played and all(c["completion"].startswith("[assistant]") for c in played)  # whole episodes
    # rows with an even answer break the environment: no reward, no advantage, counted
    assert broken and all(c["advantage"] == 0.0 for c in broken)
    assert sum(r["episodes/failed"] for r in steps) > 0
    assert set(json.loads((run / "eval.json").read_text())) == {"before", "after"}
