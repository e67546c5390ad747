"""Correcting for a rollout engine whose numerics differ from the trainer's (vLLM's kernels, bf16, its own
sampler): the tokens were drawn from pi_sampler, while the loss differentiates pi_trainer. Even with the same
weights the two differ slightly per token, which makes "on-policy" GRPO quietly off-policy.

Truncated importance sampling (TIS; Yao, Liu et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training") weights each token's policy-gradient term by min(pi_trainer / pi_sampler, C). TRL
shipped it as GRPOConfig's `vllm_importance_sampling_cap`, C = 2.0 with token-level truncation; later TRL
versions default to masking whole sequences (`sequence_mask`) with C = 3.0. graft's `grpo.tis_cap` is the
token-level truncation, default 2.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graft.algo.losses import k3_kl


def sampler_log_ratio(
    trainer_logprobs: torch.Tensor,  # (B, T) pi_trainer of the sampled tokens (the policy that sampled)
    sampler_logprobs: torch.Tensor,  # (B, T) what the rollout engine reported for the same tokens
    mask: torch.Tensor,  # (B, T) 1 on completion tokens
) -> torch.Tensor:  # (B, T) log(pi_trainer / pi_sampler), 0 on padding
    """Per-token log ratio between the trainer's and the sampler's probability of each sampled token."""
    # where, not a product: padding may hold anything (a -inf there would make inf * 0 = nan)
    diff = trainer_logprobs.detach().float() - sampler_logprobs.float()
    return torch.where(mask.bool(), diff, 0.0)


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor,  # (B, T)
    sampler_logprobs: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    cap: float,
) -> torch.Tensor:  # (B, T) min(pi_trainer / pi_sampler, cap), 0 on padding, no gradient
    """TIS weights: multiply each token's surrogate loss by these (before aggregation, not the KL term).

    trainer_logprobs must be the trainer's log-probs of the policy that sampled (old log-probs, or the
    current ones detached when the batch is trained on once): a weight corrects the engine's numerics, not
    the policy's change since sampling, which the clipped ratio already handles. The weight is a constant
    (no gradient), and only large ratios are cut: a token the sampler over-weighted (ratio < 1) keeps its
    small weight, which is unbiased; a token it under-weighted would otherwise blow up the variance.
    """
    if cap < 1.0:
        raise ValueError(f"the TIS cap must be >= 1, got {cap}")
    ratio = torch.exp(sampler_log_ratio(trainer_logprobs, sampler_logprobs, mask))
    return torch.where(mask.bool(), torch.clamp(ratio, max=cap), 0.0)


@dataclass
class MismatchMetrics:
    """How far the sampler's log-probs are from the trainer's, over completion tokens (scalars)."""

    abs_logp_diff: torch.Tensor  # mean |log pi_trainer - log pi_sampler|
    kl: torch.Tensor  # k3 estimate of KL(pi_sampler || pi_trainer) (tokens were drawn from the sampler)
    max_ratio: torch.Tensor  # largest pi_trainer / pi_sampler
    min_ratio: torch.Tensor  # smallest pi_trainer / pi_sampler
    capped_fraction: torch.Tensor  # share of tokens whose ratio exceeds the cap (0 without one)

    def as_dict(self, prefix: str = "sampler_") -> dict[str, float]:
        return {f"{prefix}{name}": float(value) for name, value in vars(self).items()}


@torch.no_grad()
def mismatch_metrics(
    trainer_logprobs: torch.Tensor,  # (B, T)
    sampler_logprobs: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    cap: float | None = None,
) -> MismatchMetrics:
    """Sampler/trainer mismatch to log each step: rising values mean the engine no longer samples the
    policy being trained (a missed weight sync, a dtype or temperature mismatch). Ratios are 1 and the
    rest 0 when no token is masked in."""
    keep = mask.bool()
    n = keep.sum().clamp(min=1)
    log_ratio = sampler_log_ratio(trainer_logprobs, sampler_logprobs, mask)  # 0 on padding
    # k3 with logp = sampler, ref = trainer: r - log r - 1 with r = pi_trainer / pi_sampler (0 on padding)
    kl = k3_kl(torch.zeros_like(log_ratio), log_ratio)
    zero = log_ratio.new_zeros(())
    any_token = bool(keep.any())
    return MismatchMetrics(
        abs_logp_diff=log_ratio.abs().sum() / n,
        kl=kl.sum() / n,
        max_ratio=log_ratio[keep].max().exp() if any_token else zero.exp(),
        min_ratio=log_ratio[keep].min().exp() if any_token else zero.exp(),
        capped_fraction=(log_ratio[keep] > math.log(cap)).float().sum() / n if cap is not None else zero,
    )
