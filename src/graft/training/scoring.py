"""Step 2 of a GRPO step: every completion scored by each reward function and weighted into one total, with
the inputs the functions see (chat messages, the completion, every dataset column)."""

from __future__ import annotations

import torch

from graft.batch import Rollout
from graft.config import Config
from graft.evaluation import decode_completions
from graft.rewards.runtime import RewardRuntime, reward_name
from graft.tasks import Problem, Task
from graft.training.setup import StepSetup


def reward_inputs(tokenizer, task: Task, problems: list[Problem], rollout: Rollout, cfg: Config):
    """(completion texts, prompts as chat messages, columns) for the reward functions, one per completion:
    the dataset columns plus the completion token ids and the length limit (TRL passes both; length
    rewards use them)."""
    token_lists = rollout.completion_token_lists()
    texts = decode_completions(tokenizer, token_lists)
    prompts, columns = task.reward_inputs([p for p in problems for _ in range(rollout.group_size)])
    columns["completion_ids"] = token_lists
    columns["max_completion_length"] = [cfg.generation.max_new_tokens] * len(texts)
    return texts, prompts, columns


def score_completions(
    runtime: RewardRuntime,
    weights: list[float],
    prompts: list,
    completions: list[str],
    columns: dict[str, list],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total (B,), per-function (B,) each), NaN where no reward applies. Rewards see the chat messages,
    the completion and every dataset column (`answer` and the rest), one entry per completion. The total
    is the weighted sum over the functions that gave a value, NaN only when none did."""
    scores = runtime.score(prompts, completions, columns)
    per_fn = {reward_name(spec): torch.tensor(values, dtype=torch.float32) for spec, values in scores.items()}
    weighted = torch.stack([w * v for w, v in zip(weights, per_fn.values(), strict=True)])  # (F, B)
    total = torch.where(torch.isnan(weighted).all(0), torch.nan, torch.nansum(weighted, 0))
    return total, per_fn


def score_rollout(
    setup: StepSetup, problems: list[Problem], rollout: Rollout
) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """(completion texts, total (B,), per-function (B,) each); the correctness reward is always among the
    functions, so accuracy is logged even when the run trains on other rewards."""
    texts, prompts, columns = reward_inputs(setup.tokenizer, setup.task, problems, rollout, setup.cfg)
    total, per_fn = score_completions(setup.rewards, setup.reward_weights, prompts, texts, columns)
    if setup.correctness_name not in per_fn:
        per_fn[setup.correctness_name] = torch.tensor(setup.correctness(prompts, texts, **columns))
    return texts, total, per_fn
