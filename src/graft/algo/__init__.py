"""GRPO math as pure functions on tensors: no models, no I/O. Shapes are noted as (B, T):
B completions in the batch, T completion positions, G completions per group."""

from graft.algo.advantages import group_advantages, weighted_reinforce_advantages
from graft.algo.entropy import adapt_entropy_coef, entropy_bonus_surrogate
from graft.algo.importance import (
    MismatchMetrics,
    mismatch_metrics,
    sampler_log_ratio,
    truncated_importance_weights,
)
from graft.algo.logprobs import linear_token_logprobs, token_logprobs
from graft.algo.losses import (
    PolicyLossOutput,
    aggregate_loss,
    clipped_surrogate,
    importance_log_ratio,
    k3_kl,
    policy_loss,
)

__all__ = [
    "MismatchMetrics",
    "PolicyLossOutput",
    "adapt_entropy_coef",
    "aggregate_loss",
    "clipped_surrogate",
    "entropy_bonus_surrogate",
    "group_advantages",
    "importance_log_ratio",
    "k3_kl",
    "linear_token_logprobs",
    "mismatch_metrics",
    "policy_loss",
    "sampler_log_ratio",
    "token_logprobs",
    "truncated_importance_weights",
    "weighted_reinforce_advantages",
]
