"""Per-token log-probabilities of chosen tokens, without materialising a full (B, T, V) log-softmax."""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,  # (B, T, V) raw logits predicting each position's token
    token_ids: torch.Tensor,  # (B, T) the tokens whose log-prob we want
    temperature: float = 1.0,
    chunk_rows: int = 1024,
) -> torch.Tensor:  # (B, T) float32
    """log softmax(logits / temperature)[token] for each position.

    The temperature is the sampling temperature: the sampler drew tokens from softmax(logits / T), so the
    ratio pi_new / pi_old is only meaningful when both sides use the same T. Rows are processed in chunks
    so the float32 log-softmax of a 49k (or 150k) vocabulary never exists for the whole batch at once.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    B, T, V = logits.shape
    flat_logits = logits.reshape(B * T, V)
    flat_ids = token_ids.reshape(B * T)
    out = []
    for start in range(0, B * T, chunk_rows):
        rows = flat_logits[start : start + chunk_rows].float()
        if temperature != 1.0:
            rows = rows / temperature
        chosen = rows.gather(1, flat_ids[start : start + chunk_rows, None]).squeeze(1)
        out.append(chosen - torch.logsumexp(rows, dim=-1))
    return torch.cat(out).view(B, T)
