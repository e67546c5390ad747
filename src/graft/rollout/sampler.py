"""Sample groups of completions with a KV-cached decode loop, returning token ids and sampling log-probs.

Token-in / token-out: the ids sampled here are exactly the ids trained on; nothing is re-tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, P), mask (N, P)) with each sequence pushed to the right edge."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def completion_mask_from_ids(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T), has_stop (B,)): 1 up to and including the first stop token. Built from stop positions,
    not from `ids != pad`, because many models (SmolLM2 among them) use the same id for pad and EOS."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stop tokens strictly before each position
    return (stops_before == 0).long(), is_stop.any(dim=1)


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of tokens whose share of the (possibly unnormalised) mass reaches
    top_p; the most likely token is always kept."""
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p * probs.sum(dim=-1, keepdim=True), 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from probs / probs.sum() by inverting the CDF with a single uniform per row.
    torch.multinomial draws an exponential for every vocabulary entry, which on a CPU costs more than the
    LM head itself for a 49k vocabulary. The running sum is float64 so it does not drift over V, and a
    token with probability 0 (top-p cut, held-back stop token) is never drawn: the search finds the first
    cumulative mass strictly above u * total, and u < 1."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


@torch.no_grad()  # not inference_mode: the rollout tensors feed autograd in the training pass
def sample(
    model,
    prompts: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample `group_size` completions for each prompt.

    Each prompt is prefilled once and its KV cache repeated for its group; a completion that stops leaves
    the decode batch (and the cache) at once, so finished rows cost nothing. Log-probs are those of the
    sampling distribution softmax(logits / temperature) before top-p filtering and before stop tokens are
    held back for `min_new_tokens`: the same quantity the training pass computes. With greedy=True tokens
    are argmax and log-probs use temperature 1.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    logits = out.logits[:, -1, :].float()  # (num_prompts, V)
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)

    B = prompt_ids.shape[0]
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token_logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    token_entropy = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    active = torch.arange(B, device=device)  # rows still decoding, in the order the cache holds them
    attention_mask = prompt_mask
    next_position = prompt_mask.sum(dim=1, keepdim=True)  # (B, 1)
    stop = torch.tensor(stop_ids, device=device)
    width = 0
    for step in range(max_new_tokens):
        width = step + 1
        scaled = logits if greedy or temperature == 1.0 else logits / temperature
        # one float32 log-softmax feeds the log-probs, the entropy and the draw (no float64 softmax)
        logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
        probs = logp.exp()
        choice = probs
        if step < min_new_tokens:  # hold stop tokens back (forced-length benchmarks)
            choice = probs.index_fill(1, stop, 0.0)
        if greedy:
            token = choice.argmax(dim=-1)
        else:
            token = _sample_categorical(_filter_top_p(choice, top_p) if top_p < 1.0 else choice, generator)
        tokens[active, step] = token
        token_logprobs[active, step] = logp.gather(1, token[:, None]).squeeze(1)
        # health: entropy collapse. nansum: a token with logit -inf has p log p = 0 * -inf
        token_entropy[active, step] = -(probs * logp).nansum(dim=-1)
        if step == max_new_tokens - 1:
            break
        running = ~torch.isin(token, stop)
        if not running.all():
            if not running.any():
                break
            keep = running.nonzero().squeeze(1)
            active, token = active[keep], token[keep]
            cache.batch_select_indices(keep)
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_position = next_position + 1

    completion_ids = tokens[:, :width]  # (B, T)
    completion_mask, has_stop = completion_mask_from_ids(completion_ids, stop_ids)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=token_logprobs[:, :width] * completion_mask,
        truncated=~has_stop,
        group_size=group_size,
        entropy=token_entropy[:, :width] * completion_mask,
    )
