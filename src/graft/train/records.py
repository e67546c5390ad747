"""What a GRPO step logs: its metrics row and one completions-log record per completion."""

from __future__ import annotations

import torch


def step_metrics(batch, per_fn: dict[str, torch.Tensor], zero_variance: torch.Tensor) -> dict:
    """Rewards, lengths and advantages of a graft.train.grpo.ScoredBatch, for metrics.jsonl."""
    r = batch.rollout
    lengths = r.completion_lengths.float()
    scored = batch.rewards[~torch.isnan(batch.rewards)]  # completions some reward applied to
    metrics = {
        "reward/mean": batch.rewards.nanmean().item(),
        "reward/std": scored.std().item() if scored.numel() > 1 else 0.0,
    }
    for name, values in per_fn.items():
        metrics[f"reward/{name}/mean"] = values.nanmean().item()
    if r.entropy is not None:
        metrics["entropy"] = (r.entropy.sum() / r.completion_mask.sum().clamp(min=1)).item()
    metrics.update(
        {
            "completion_length/mean": lengths.mean().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_fraction": r.truncated.float().mean().item(),
            "zero_variance_group_fraction": zero_variance.float().mean().item(),
            "advantage/abs_mean": batch.advantages.abs().mean().item(),
        }
    )
    return metrics


def completion_rows(step: int, problems, texts: list[str], batch, per_fn: dict) -> list[dict]:
    """One completions-log record per completion: what was asked, what came back, how it scored."""
    r, G = batch.rollout, batch.rollout.group_size
    rows = []
    for i, text in enumerate(texts):
        problem = problems[i // G]
        rows.append({
            "step": step, "group": i // G, "prompt": problem.prompt, "answer": problem.answer,
            "completion": text, "reward": batch.rewards[i].item(),
            **{f"reward/{name}": values[i].item() for name, values in per_fn.items()},
            "advantage": batch.advantages[i].item(), "length": int(r.completion_mask[i].sum()),
            "truncated": bool(r.truncated[i]),
        })  # fmt: skip
    return rows
