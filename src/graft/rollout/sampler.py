"""Sample groups of completions with a KV-cached decode loop, returning token ids and sampling log-probs.

Token-in / token-out: the ids sampled here are exactly the ids trained on; nothing is re-tokenized.
"""

from __future__ import annotations

import torch

from graft.batch import Rollout
from graft.kv_cache import cache_kwargs, output_cache
from graft.rollout.buffers import ReservedBuffer

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # a transformers without per-layer caches: reserve_cache leaves its caches alone
    DynamicLayer = object


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


def _sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None, block: int = 1024
) -> torch.Tensor:  # (B,)
    """One draw per row from probs / probs.sum() (B, V) by inverting the CDF with a single uniform per row.

    torch.multinomial draws an exponential for every vocabulary entry, and even one float64 cumsum over
    the vocabulary costs more than the LM head on a CPU (a sequential scan; benchmarks/NOTES.md). So the
    search runs in two levels: float64 sums of `block`-wide slices locate the slice holding the uniform,
    and only that slice is scanned. Sums are float64 so the CDF does not drift over V. A token with
    probability 0 (top-p cut, held-back stop token) is never drawn: each level takes the first cumulative
    mass strictly above the target, and the target stays strictly below the level's total.
    """
    B, V = probs.shape
    n_full = V // block
    sums = [probs[:, : n_full * block].reshape(B, n_full, block).sum(-1, dtype=torch.float64)]
    if V % block:
        sums.append(probs[:, n_full * block :].sum(-1, keepdim=True, dtype=torch.float64))
    block_cdf = torch.cat(sums, dim=1).cumsum(dim=1)  # (B, nb)
    total = block_cdf[:, -1:]
    u = torch.rand(B, 1, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rand * total may round up
    k = torch.searchsorted(block_cdf, u, right=True).clamp_(max=block_cdf.shape[1] - 1)  # (B, 1) u's slice
    below = torch.where(k > 0, block_cdf.gather(1, (k - 1).clamp(min=0)), 0.0)  # mass before slice k
    columns = k * block + torch.arange(block, device=probs.device)  # (B, block)
    inside = columns < V
    slice_probs = probs.gather(1, columns.clamp(max=V - 1)).masked_fill(~inside, 0.0)
    slice_cdf = slice_probs.cumsum(dim=1, dtype=torch.float64)  # (B, block)
    # the slice's own scan can total a hair less than its sum above (rounding order): keep u inside it
    rest = torch.minimum(u - below, torch.nextafter(slice_cdf[:, -1:], torch.zeros_like(total)))
    j = torch.searchsorted(slice_cdf, rest, right=True)
    return (k * block + j).squeeze(1).clamp_(max=V - 1)  # the clamps only matter for all-zero rows


class ReservedLayer(DynamicLayer):
    """One attention layer of a transformers cache on ReservedBuffers (graft.rollout.buffers): a decode step
    writes its new column in place, where transformers' DynamicLayer copies the whole cache (torch.cat)
    every step, O(T^2) bytes over a completion. The keys and values attention reads are views."""

    def __init__(self, layer, capacity: int):
        super().__init__()
        self.device, self.is_initialized = layer.keys.device, True
        self.key_buffer = ReservedBuffer(layer.keys, time_dim=2, batch_dim=0, capacity=capacity)
        self.value_buffer = ReservedBuffer(layer.values, time_dim=2, batch_dim=0, capacity=capacity)
        self.keys, self.values = self.key_buffer.filled, self.value_buffer.filled

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self.key_buffer.append(key_states), self.value_buffer.append(value_states)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for buffer in (self.key_buffer, self.value_buffer):
            buffer.select_rows(indices)
        self.keys, self.values = self.key_buffer.filled, self.value_buffer.filled


def reserve_cache(cache, capacity: int):
    """Swap each plain (full-attention, dynamic) layer of a transformers cache for a ReservedLayer of
    `capacity` positions. Other layer kinds (sliding windows, quantized, linear attention) and other caches
    (graft's decoder's, which grows in place by itself) stay as they are."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is object or not isinstance(layers, list):
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = ReservedLayer(layer, capacity)
    return cache


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
    device = model.device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = output_cache(out)
    logits = out.logits[:, -1, :].float()  # (num_prompts, V)
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    cache = reserve_cache(cache, prompt_ids.shape[1] + max_new_tokens)

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
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        cache = output_cache(out)
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
