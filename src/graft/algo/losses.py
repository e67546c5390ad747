"""The GRPO policy loss: importance ratio -> clipped surrogate (+ k3 KL) -> aggregation over tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from graft.algo.entropy import entropy_bonus_surrogate

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (an all-masked row gives 0, not NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def importance_log_ratio(
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    old_logprobs: torch.Tensor,  # (B, T) policy that sampled the batch, no grad
    mask: torch.Tensor,  # (B, T) 1 on completion tokens
    level: ImportanceLevel = "token",
) -> torch.Tensor:  # (B, T) for "token", (B, 1) for "sequence"
    """log(pi / pi_old) per token, or its per-sequence mean (GSPO: one ratio per completion, so a long
    completion's ratio is not a product of hundreds of noisy token ratios)."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_mean(log_ratio, mask, dim=1).unsqueeze(1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")


def clipped_surrogate(
    log_ratio: torch.Tensor,  # (B, T) or (B, 1)
    advantages: torch.Tensor,  # (B,)
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-style per-token loss -min(r A, clip(r, 1-eps, 1+eps_high) A), and where clipping bit (bool).

    epsilon_high > epsilon ("clip-higher", DAPO) lets low-probability tokens grow faster, against entropy
    collapse. delta caps the unclipped ratio too, so a negative-advantage token with a huge ratio cannot
    dominate the gradient (two-sided clipping).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped_obj = ratio * adv
    clipped_obj = clipped_ratio * adv
    per_token_loss = -torch.min(unclipped_obj, clipped_obj)
    is_clipped = clipped_obj < unclipped_obj  # min picked the clipped side
    return per_token_loss, is_clipped


def k3_kl(
    logprobs: torch.Tensor,  # (B, T) current policy
    ref_logprobs: torch.Tensor,  # (B, T) reference policy
) -> torch.Tensor:  # (B, T)
    """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1. Unbiased, always >= 0, and its
    gradient is that of the true KL in expectation (Schulman, "Approximating KL divergence")."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1.0


def aggregate_loss(
    per_token_loss: torch.Tensor,  # (B, T) one micro-batch
    mask: torch.Tensor,  # (B, T)
    loss_type: LossType,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> torch.Tensor:
    """Reduce a micro-batch's per-token losses so that summing over the micro-batches of one optimizer
    step gives that step's loss (gradient accumulation is exact, not an average of averages, except for
    bnpo, whose definition is per micro-batch).

    num_sequences / num_tokens: completions / completion tokens in the whole optimizer step.
    - grpo:    mean over sequences of each sequence's token mean (long completions weigh less per token)
    - bnpo:    token mean within each micro-batch, averaged over micro-batches
    - dr_grpo: token sum / (num_sequences * max_completion_length), a constant: no length bias
    - dapo:    token sum / num_tokens, one global token mean over the optimizer step
    """
    mask = mask.to(per_token_loss.dtype)
    token_sum = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        return masked_mean(per_token_loss, mask, dim=1).sum() / num_sequences
    if loss_type == "bnpo":
        num_micro = num_sequences / per_token_loss.shape[0]
        return token_sum / mask.sum().clamp(min=1.0) / num_micro
    if loss_type == "dr_grpo":
        return token_sum / (num_sequences * max_completion_length)
    if loss_type == "dapo":
        return token_sum / max(num_tokens, 1)
    raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, this micro-batch's share of the optimizer step's loss
    clip_fraction: torch.Tensor  # scalar, share of completion tokens whose ratio was clipped
    kl: torch.Tensor | None  # scalar mean k3 KL over completion tokens, None when beta = 0
    sampler_metrics: dict[str, float] | None = None  # sampler/trainer mismatch (graft.algo.importance)


def policy_loss(
    logprobs: torch.Tensor,  # (B, T)
    old_logprobs: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T)
    *,
    loss_type: LossType,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: ImportanceLevel = "token",
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,  # (B, T), required when beta > 0
    token_weights: torch.Tensor | None = None,  # (B, T) constant weight of each token's surrogate (TIS)
    entropy_coef: float = 0.0,
    entropy_baseline: torch.Tensor | None = None,  # (B, T) the sampler's entropy per token; None: the mean
) -> PolicyLossOutput:
    """The whole GRPO objective for one micro-batch. entropy_coef > 0 adds an entropy bonus (graft.algo.
    entropy): the sampled tokens' surprisal under the old policy against `entropy_baseline`, or against
    their masked mean where the sampler logged no entropy."""
    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, importance_sampling_level)
    per_token_loss, is_clipped = clipped_surrogate(log_ratio, advantages, epsilon, epsilon_high, delta)
    per_token_loss = per_token_loss.expand_as(logprobs)
    if entropy_coef > 0:
        surprisal = -old_logprobs.detach()
        baseline = masked_mean(surprisal, mask) if entropy_baseline is None else entropy_baseline
        token_log_ratio = logprobs - old_logprobs.detach()  # per token even under sequence-level ratios
        per_token_loss = per_token_loss + entropy_coef * entropy_bonus_surrogate(
            token_log_ratio, surprisal, baseline
        )
    if token_weights is not None:  # the policy-gradient term only: the KL below is not a sampled estimate
        per_token_loss = per_token_loss * token_weights.detach()
    is_clipped = is_clipped.expand_as(logprobs)
    kl = None
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        per_token_kl = k3_kl(logprobs, ref_logprobs)
        per_token_loss = per_token_loss + beta * per_token_kl
        kl = masked_mean(per_token_kl.detach(), mask)
    loss = aggregate_loss(per_token_loss, mask, loss_type, num_sequences, num_tokens, max_completion_length)
    clip_fraction = masked_mean(is_clipped.float(), mask)
    return PolicyLossOutput(loss=loss, clip_fraction=clip_fraction, kl=kl)
