"""GRPO math as pure functions on tensors: no models, no I/O. Shapes are noted as (B, T):
B completions in the batch, T completion positions, G completions per group."""

from graft.algo.advantages import group_advantages
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
    "PolicyLossOutput",
    "aggregate_loss",
    "clipped_surrogate",
    "group_advantages",
    "importance_log_ratio",
    "k3_kl",
    "linear_token_logprobs",
    "policy_loss",
    "token_logprobs",
]
