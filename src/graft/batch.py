"""The batches a GRPO step passes along: a rollout (what was sampled) and a scored batch (what the update
trains on). A leaf module: the sampler, the fast path, the loop and the records all use these types."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """A batch of B = num_prompts * group_size completions; a group's completions are adjacent."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded with pad_id after the first stop token
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first stop token
    logprobs: torch.Tensor  # (B, T) float32 log-prob of each sampled token under the sampler (0 on padding)
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens without a stop token
    group_size: int
    entropy: torch.Tensor | None = None  # (B, T) entropy of the sampling distribution (0 on padding)

    @property
    def completion_lengths(self) -> torch.Tensor:  # (B,)
        return self.completion_mask.sum(dim=1)

    def completion_token_lists(self) -> list[list[int]]:
        """Each completion's token ids up to and including its stop token (B lists)."""
        return [
            ids[:n].tolist()
            for ids, n in zip(self.completion_ids, self.completion_lengths.tolist(), strict=True)
        ]


@dataclass
class ScoredBatch:
    """A rollout plus everything the update needs; (B, ...) with a group's completions adjacent."""

    rollout: Rollout
    rewards: torch.Tensor  # (B,) weighted sum of the reward functions; NaN where none applied
    advantages: torch.Tensor  # (B,) group-relative
    old_logprobs: torch.Tensor | None  # (B, T) the policy before this step's updates; None when mu = 1
    ref_logprobs: torch.Tensor | None  # (B, T) the reference policy; None when beta = 0
    completions: list[str] = field(default_factory=list)  # (B,) decoded, as the rewards saw them
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) each function
