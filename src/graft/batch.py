"""The batches a GRPO step passes along: a rollout (what was sampled) and a scored batch (what the update
trains on). A leaf module: the sampler, the fast path, the loop and the records all use these types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    # (B, T) 1 on tokens the model sampled, the ones the loss counts; None = completion_mask. Multi-turn
    # episodes (graft.rollout.episodes) set it: their completions hold environment tokens too, attended to
    # (completion_mask) but never trained on
    loss_mask: torch.Tensor | None = None
    sampler: str = "graft"  # the engine that drew the tokens and reported `logprobs` (graft, vllm)

    @property
    def trained_mask(self) -> torch.Tensor:  # (B, T) the tokens the loss counts: the sampled ones
        return self.completion_mask if self.loss_mask is None else self.loss_mask

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
    problems: list = field(default_factory=list)  # (B / G,) the problem of each group
    loss_rows: torch.Tensor | None = None  # (B,) bool: rows the loss counts (dynamic sampling); None = all
    metrics: dict[str, float] = field(
        default_factory=dict
    )  # what the rollout measured (episodes: turns, failures)
    # every group drawn in the step (dynamic sampling's dropped ones too) with whether all its completions
    # were fully right: what prompt selection (train.skip_solved) learns difficulty from
    solved: list[tuple[Any, bool]] = field(default_factory=list)


def group_rows(groups: list[int], group_size: int) -> torch.Tensor:
    """(len(groups) * group_size,) the batch rows of groups `groups`, in that order."""
    return torch.tensor([g * group_size + i for g in groups for i in range(group_size)], dtype=torch.long)


def select_groups(rollout: Rollout, groups: list[int]) -> Rollout:
    """The rollout's groups `groups` (indices of groups, in that order) as a rollout of their own."""
    G = rollout.group_size
    rows = group_rows(groups, G)
    entropy = None if rollout.entropy is None else rollout.entropy[rows]
    loss_mask = None if rollout.loss_mask is None else rollout.loss_mask[rows]
    return Rollout(
        prompt_ids=rollout.prompt_ids[rows],
        prompt_mask=rollout.prompt_mask[rows],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        logprobs=rollout.logprobs[rows],
        truncated=rollout.truncated[rows],
        group_size=G,
        entropy=entropy,
        loss_mask=loss_mask,
        sampler=rollout.sampler,
    )


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several of the same group size: prompts left-padded and completions right-padded
    to the widest, with masks (and log-probs, entropies) zero on the added padding."""
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    T = max(r.completion_ids.shape[1] for r in rollouts)

    def left(x: torch.Tensor, width: int, value) -> torch.Tensor:  # (B, w) -> (B, width), padded on the left
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x: torch.Tensor, width: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    entropies = [r.entropy for r in rollouts]
    # None stands for completion_mask: spell it out when another part has a loss mask of its own
    loss_masks = [r.completion_mask if r.loss_mask is None else r.loss_mask for r in rollouts]
    return Rollout(
        prompt_ids=torch.cat([left(r.prompt_ids, P, pad_id) for r in rollouts]),
        prompt_mask=torch.cat([left(r.prompt_mask, P, 0) for r in rollouts]),
        completion_ids=torch.cat([right(r.completion_ids, T, pad_id) for r in rollouts]),
        completion_mask=torch.cat([right(r.completion_mask, T, 0) for r in rollouts]),
        logprobs=torch.cat([right(r.logprobs, T, 0.0) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        group_size=rollouts[0].group_size,
        entropy=None
        if any(e is None for e in entropies)
        else torch.cat([right(e, T, 0.0) for e in entropies]),
        loss_mask=None
        if all(r.loss_mask is None for r in rollouts)
        else torch.cat([right(m, T, 0) for m in loss_masks]),
        sampler=rollouts[0].sampler,
    )
