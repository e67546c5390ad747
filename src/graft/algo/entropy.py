"""Entropy control: keep the sampling policy from going deterministic before it has learned the task.

GRPO learns only from groups whose completions differ. A policy whose token entropy collapses samples the
same completion G times, right or wrong, and the wrong ones are never corrected. The entropy of a token's
distribution p (at the sampling temperature) has the gradient

    grad H = -sum_y p(y) (log p(y) + H) grad log p(y) = E_{y~p}[(s(y) - H) grad log p(y)],  s(y) = -log p(y)

so a sampled token's surprisal minus the distribution's entropy is an unbiased per-token advantage for H,
computed from what the rollout already holds (the sampled log-prob and the entropy it logged), with no
second pass over the vocabulary. The coefficient follows a target entropy (Skywork-OR1's adaptive entropy
control): it grows while the policy is below the target and shrinks back to 0 above it, so the bonus acts
only against a collapse and leaves a healthy run untouched.
"""

from __future__ import annotations

import torch


def entropy_bonus_surrogate(
    log_ratio: torch.Tensor,  # (B, T) log(pi / pi_old) per token, with grad
    surprisal: torch.Tensor,  # (B, T) -log pi_old(sampled token), no grad
    baseline: torch.Tensor,  # (B, T) or broadcastable: the entropy pi_old had there (the estimator's baseline)
) -> torch.Tensor:  # (B, T)
    """Per-token loss whose gradient is minus the sampled estimate of the entropy's gradient: minimising
    it raises the token entropy. At ratio 1 (mu = 1) its gradient is -(s - H) grad log pi; for mu > 1 the
    importance ratio corrects for sampling from pi_old, as in the policy-gradient term."""
    return -(surprisal - baseline).detach() * torch.exp(log_ratio)


def adapt_entropy_coef(
    coef: float,
    entropy: float,  # the step's mean token entropy (nats)
    target: float,  # nats
    step: float,  # the coefficient's change per GRPO step
    max_coef: float,
) -> float:
    """The next step's coefficient: up by `step` while the entropy is below the target, down by `step`
    (not below 0) once it is above, never past max_coef."""
    coef = coef + step if entropy < target else coef - step
    return min(max(coef, 0.0), max_coef)
