"""What a GRPO step logs: its metrics row, one completions-log record per completion, and how long each
phase of the step took."""

from __future__ import annotations

import contextlib
import time

import torch

from graft.algo.losses import masked_mean
from graft.batch import ScoredBatch


def step_metrics(batch: ScoredBatch, zero_variance: torch.Tensor) -> dict:
    """Rewards, lengths and advantages of a scored batch, for metrics.jsonl."""
    rollout = batch.rollout
    lengths = rollout.completion_lengths.float()
    scored = batch.rewards[~torch.isnan(batch.rewards)]  # completions some reward applied to
    metrics = {
        "reward/mean": batch.rewards.nanmean().item(),
        "reward/std": scored.std().item() if scored.numel() > 1 else 0.0,
    }
    for name, values in batch.reward_components.items():
        metrics[f"reward/{name}/mean"] = values.nanmean().item()
    if rollout.entropy is not None:
        metrics["entropy"] = (rollout.entropy.sum() / rollout.completion_mask.sum().clamp(min=1)).item()
    else:  # an engine that logs no entropy (vLLM): its sampled estimate, the sampled tokens' mean surprisal
        metrics["surprisal"] = masked_mean(-rollout.logprobs, rollout.trained_mask).item()
    metrics.update(
        {
            "completion_length/mean": lengths.mean().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_fraction": rollout.truncated.float().mean().item(),
            "zero_variance_group_fraction": zero_variance.float().mean().item(),
            "advantage/abs_mean": batch.advantages.abs().mean().item(),
        }
    )
    return metrics


def completion_rows(step: int, batch: ScoredBatch) -> list[dict]:
    """One completions-log record per completion: what was asked, what came back, how it scored."""
    rollout, group_size = batch.rollout, batch.rollout.group_size
    rows = []
    for i, text in enumerate(batch.completions):
        problem = batch.problems[i // group_size]
        rewards = {f"reward/{name}": values[i].item() for name, values in batch.reward_components.items()}
        rows.append(
            {
                "step": step,
                "group": i // group_size,
                "prompt": problem.prompt,
                "answer": problem.answer,
                "completion": text,
                "reward": batch.rewards[i].item(),
                **rewards,
                "advantage": batch.advantages[i].item(),
                "length": int(rollout.completion_mask[i].sum()),
                "truncated": bool(rollout.truncated[i]),
            }
        )
    return rows


class PhaseTimer:
    """Wall time of each named phase of a step (`with timer.phase("rollout"): ...`), logged as time/<name>
    next to time/step, the sum over the phases."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {"time/step": sum(self.seconds.values()), **{f"time/{k}": v for k, v in self.seconds.items()}}
