"""Group-relative advantages: each completion is scored against the other completions of its prompt."""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def group_advantages(
    rewards: torch.Tensor,  # (B,) with B = num_groups * group_size, a group's completions adjacent; NaN = none
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (advantages (B,), zero_variance (num_groups,) bool).

    advantage = reward - mean(group), then divided by the group's std ("group", as in the GRPO paper),
    by the std of the whole batch ("batch", less noisy for small groups), or not at all ("none",
    Dr. GRPO: the std division over-weights groups that are nearly all right or all wrong).
    std is the unbiased sample std (torch default), as TRL uses, so numbers match across tools.
    A NaN reward means "no reward applies" (a reward function returned None): that completion is left
    out of its group's mean and std and gets advantage 0. A group whose remaining rewards are all equal
    (or that has fewer than two) carries no learning signal: its advantages are exactly 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True)  # (num_groups, 1)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, grouped - mean, torch.zeros_like(grouped))  # (num_groups, G)
    group_std = (centered.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    first = (
        torch.where(valid, grouped, torch.full_like(grouped, float("inf"))).min(dim=1, keepdim=True).values
    )
    zero_variance = ((grouped == first) | ~valid).all(dim=1) | (count.squeeze(1) < 2)  # exact, not std < tol
    if scale_rewards == "group":
        centered = centered / (group_std + eps)
    elif scale_rewards == "batch":
        centered = centered / (rewards[~torch.isnan(rewards)].std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    centered = centered.masked_fill(zero_variance.unsqueeze(1), 0.0)
    return centered.reshape(-1), zero_variance


def weighted_reinforce_advantages(
    rewards: torch.Tensor,  # (B,) rewards in [0, 1]; NaN = none
    positive_weight: float = 0.1,
) -> torch.Tensor:
    """W-REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
    Reasoning"): advantage = lambda * r - (1 - r), so a right completion (r = 1) gets +lambda and a wrong one
    (r = 0) gets -1, with no group baseline. A group whose completions are all wrong still teaches: it pushes
    probability away from those answers, which keeps the policy exploring where GRPO's group-relative
    advantage is 0 and the policy collapses onto a wrong answer. Rewards outside [0, 1] are clamped into it;
    a NaN reward gets advantage 0. Returns (B,)."""
    r = rewards.clamp(0.0, 1.0)
    advantages = positive_weight * r - (1.0 - r)
    return torch.nan_to_num(advantages, nan=0.0)
