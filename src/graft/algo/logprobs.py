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


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[token], chunk by chunk, never holding (N, V) logits.

    Backward recomputes each chunk's logits (one extra LM-head matmul) instead of keeping them: for a 49k
    vocabulary that trades ~20% more head FLOPs for not writing and re-reading 200 KB of logits per token,
    which on a CPU is the slower of the two.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature, chunk_rows):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).float() / temperature  # (n, V)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, token_ids[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, token_ids, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        # under autocast the logits were bf16 products: the backward must recompute them the same way, or
        # softmax = exp(logits - lse) no longer sums to one and the gradient is wrong
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, token_ids, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        enabled, dtype, device = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                logits = (hidden[rows] @ weight.T).float() / ctx.temperature
                # d logp / d logits = onehot(token) - softmax, scaled by the upstream gradient and 1 / T
                grad_logits = torch.exp(logits - lse[rows, None]).mul_(-grad_out[rows, None])
                grad_logits.scatter_add_(1, token_ids[rows, None], grad_out[rows, None])
                grad_logits = grad_logits.div_(ctx.temperature).to(hidden.dtype)
                if need_h:
                    grad_h[rows] = grad_logits @ weight
                if need_w:
                    grad_w += grad_logits.T.float() @ hidden[rows].float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,  # (B, T, d) final hidden states at the positions that predict each token
    weight: torch.Tensor,  # (V, d) LM head (output embedding) weight
    token_ids: torch.Tensor,  # (B, T)
    temperature: float = 1.0,
    chunk_rows: int = 128,
) -> torch.Tensor:  # (B, T) float32
    """token_logprobs(hidden @ weight.T, token_ids, temperature), fused with the LM head so memory stays
    O(chunk_rows x V) instead of O(B x T x V), in the forward and the backward pass."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    B, T, d = hidden.shape
    flat = _LinearLogprobs.apply(
        hidden.reshape(B * T, d), weight, token_ids.reshape(B * T), temperature, chunk_rows
    )
    return flat.view(B, T)
