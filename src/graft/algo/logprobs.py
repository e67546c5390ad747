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


def _head_block_logits(hidden, weight, start, vocab_block, temperature):
    """(logits / T of vocabulary rows [start, start + vocab_block) as float32 (n, v), that block's weight).
    T divides the float32 logits, as the sampler does, not the hidden state: under bf16 autocast the two
    round differently."""
    block = weight[start : start + vocab_block]
    logits = (hidden @ block.T).float()
    return (logits if temperature == 1.0 else logits.div_(temperature)), block


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[token], never holding more than (chunk_rows, vocab_block)
    logits: the vocabulary is swept in blocks with a running max and sum (online softmax), so the logits of
    a block are still in cache when they are exponentiated and used.

    The gradient with respect to the hidden state needs no logits at all:
        d logp / d hidden = (weight[token] - E) / T,   E = softmax(logits / T) @ weight   (n, d)
    so the forward accumulates E in the same sweep (when the hidden state needs a gradient) and the backward
    is one gather. That replaces the recompute-then-multiply backward (two LM-head matmuls) with one matmul
    in the forward. Only a trained LM head (full fine-tuning) needs the softmax again for its own gradient;
    that backward sweeps the blocks once more.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature, chunk_rows, vocab_block):
        need_h = ctx.needs_input_grad[0]
        n_rows, V = hidden.shape[0], weight.shape[0]
        out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        expected = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]  # (n, d)
            ids = token_ids[rows]
            n = h.shape[0]
            running_max = torch.full((n, 1), float("-inf"), device=h.device)  # (n, 1)
            total = torch.zeros((n, 1), device=h.device)  # (n, 1) sum of exp(logit - running_max)
            e = torch.zeros((n, h.shape[1]), device=h.device) if need_h else None  # (n, d), same scale
            chosen = torch.zeros(n, device=h.device)
            for v0 in range(0, V, vocab_block):
                logits, block = _head_block_logits(h, weight, v0, vocab_block, temperature)  # (n, v)
                local = ids - v0
                hit = (local >= 0) & (local < block.shape[0])
                picked = logits.gather(1, local.clamp(0, block.shape[0] - 1)[:, None]).squeeze(1)
                chosen = torch.where(hit, picked, chosen)
                new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
                rescale = (running_max - new_max).exp_()  # exp(-inf) = 0 on the first block
                probs = logits.sub_(new_max).exp_()  # unnormalised, in place: no second (n, v) buffer
                total = total.mul_(rescale).add_(probs.sum(dim=1, keepdim=True))
                if need_h:  # under autocast this matmul runs in the autocast dtype, as the logits did
                    e = e.mul_(rescale).add_(probs.to(block.dtype) @ block)
                running_max = new_max
            lse[rows] = (running_max + total.log()).squeeze(1)
            out[rows] = chosen - lse[rows]
            if need_h:
                expected[rows] = e.div_(total)
        ctx.save_for_backward(hidden, weight, token_ids, lse, expected)
        ctx.temperature, ctx.chunk_rows, ctx.vocab_block = temperature, chunk_rows, vocab_block
        # under autocast the logits were bf16 products: a trained head's backward must recompute them the
        # same way, or softmax = exp(logits - lse) no longer sums to one and the gradient is wrong
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, token_ids, lse, expected = ctx.saved_tensors
        T = ctx.temperature
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (weight[token_ids].float() - expected).mul_(grad_out[:, None] / T).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
            enabled, dtype, device = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                for start in range(0, hidden.shape[0], ctx.chunk_rows):
                    rows = slice(start, start + ctx.chunk_rows)
                    h = hidden[rows]
                    g = grad_out[rows, None] / T  # (n, 1)
                    for v0 in range(0, weight.shape[0], ctx.vocab_block):
                        logits, block = _head_block_logits(h, weight, v0, ctx.vocab_block, T)
                        # d logp / d logits = onehot(token) - softmax, times the upstream gradient and 1 / T
                        grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g)
                        local = token_ids[rows] - v0
                        hit = ((local >= 0) & (local < block.shape[0]))[:, None]
                        grad_logits.scatter_add_(
                            1, local.clamp(0, block.shape[0] - 1)[:, None], torch.where(hit, g, 0.0)
                        )
                        grad_w[v0 : v0 + block.shape[0]] += grad_logits.T @ hidden[rows].float()
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,  # (B, T, d) final hidden states at the positions that predict each token
    weight: torch.Tensor,  # (V, d) LM head (output embedding) weight
    token_ids: torch.Tensor,  # (B, T)
    temperature: float = 1.0,
    chunk_rows: int = 512,
    vocab_block: int = 4096,
) -> torch.Tensor:  # (B, T) float32
    """token_logprobs(hidden @ weight.T, token_ids, temperature), fused with the LM head so memory stays
    O(chunk_rows x vocab_block) instead of O(B x T x V), in the forward and the backward pass."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    B, T, d = hidden.shape
    flat = _LinearLogprobs.apply(
        hidden.reshape(B * T, d), weight, token_ids.reshape(B * T), temperature, chunk_rows, vocab_block
    )
    return flat.view(B, T)
