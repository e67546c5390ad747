"""graft's own sampling forward for Llama-shaped causal LMs (Llama, SmolLM, Qwen2, Mistral without a
sliding window), used by the rollout in place of the transformers modeling code.

Why: on a CPU a decode step of the generic modeling code spends nearly as long in Python glue (keyword
plumbing, a mask built per step, cache bookkeeping, one module call per projection) as in the matrix
products. Here a layer is four products on packed weights (q/k/v fused, o, gate/up fused, down) and a
handful of tensor ops; the rotary tables come from the model's own rotary module (so every RoPE scaling
variant it knows is honoured); keys and values go into buffers reserved once for the whole rollout.
Same math as the transformers forward up to summation order: tests compare its logits with the model's
and its greedy tokens with `generate`. Inference only, no autograd.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graft.models import PackedLinear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _plain_linear(module) -> bool:
    """An nn.Linear, or a LoRA wrapper around one (its delta is folded into the weights the Decoder gets)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return type(base) is torch.nn.Linear


def decoder_problem(model) -> str | None:
    """Why `model` (a transformers causal LM, LoRA layers allowed) cannot use the Decoder; None if it can."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type '{cfg.model_type}' (graft's decoder knows {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}'"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
        getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    ):
        return "sliding-window attention"
    body = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or any(not hasattr(body, name) for name in needed):
        return "an unexpected module layout"
    head = model.get_output_embeddings()
    if not _plain_linear(head) or getattr(head, "bias", None) is not None:
        return "an LM head that is not a plain linear layer"
    for layer in body.layers:
        modules = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]  # fmt: skip
        if not all(_plain_linear(m) for m in modules):
            return "projections that are not plain linear layers"
    return None


class KVBuffers:
    """Every layer's keys and values, (B, H_kv, capacity, D) each, filled up to `length` positions; the
    cache object the decoder returns. Rows leave (batch_select_indices) as their completions finish."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor] = [None] * num_layers  # type: ignore[list-item]
        self.values: list[torch.Tensor] = [None] * num_layers  # type: ignore[list-item]
        self.length = 0

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, T, D) keys and values at `length`; the filled part of the layer's buffers."""
        end = self.length + key.shape[2]
        if self.keys[layer] is None or end > self.keys[layer].shape[2]:
            self._grow(layer, end)
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _grow(self, layer: int, capacity: int) -> None:
        for buffers in (self.keys, self.values):
            old = buffers[layer]
            if old is None:
                continue
            new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            buffers[layer] = new

    def allocate(self, layer: int, like: torch.Tensor, capacity: int) -> None:
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        self.keys[layer], self.values[layer] = like.new_empty(shape), like.new_empty(shape)

    def reserve(self, capacity: int) -> None:
        """Room for `capacity` positions in every layer, so no decode step reallocates."""
        for layer in range(len(self.keys)):
            if self.keys[layer] is not None and self.keys[layer].shape[2] < capacity:
                self._grow(layer, capacity)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = [k[indices] for k in self.keys]
        self.values = [v[indices] for v in self.values]


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, V)
    past_key_values: KVBuffers


# a layer's packed products and the transformers projections fused into each
PROJECTIONS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


class _Layer:
    def __init__(self):
        self.qkv = self.o = self.gate_up = self.down = None
        self.input_norm = self.post_norm = None


class Decoder:
    """The sampling forward of a Llama-shaped model (see the module docstring). Called like the
    transformers model by graft.rollout.sample: input ids, attention mask, positions and a cache in;
    logits and the cache out. `load` takes new weights (after each optimizer step)."""

    def __init__(self, model, state: dict[str, torch.Tensor], dtype: torch.dtype, pack: bool):
        """`model`: the transformers model (its config, rotary module and layer count are read);
        `state`: its weights with adapters merged, as graft.models.merged_state gives them."""
        cfg = model.config
        self.dtype, self.pack = dtype, pack
        self.device = model.get_input_embeddings().weight.device
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = copy.deepcopy(model.model.rotary_emb)  # the model's RoPE, scaling variants included
        self.layers = [_Layer() for _ in model.model.layers]
        self.embed = self.final_norm = self.head = None
        self.load(state)

    # ------------------------------------------------------------------------------------------- weights

    def _linear(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        weight = torch.cat([w.detach() for w in weights]).to(self.dtype)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                              for w, b in zip(weights, biases, strict=True)]).to(self.dtype)  # fmt: skip
        return PackedLinear(weight, bias, self.dtype) if self.pack else (weight, bias)

    def load(self, state: dict[str, torch.Tensor], changed: set[str] | None = None) -> None:
        """Take weights named as in the plain transformers model (model.layers.0.self_attn.q_proj.weight,
        ..., lm_head.weight; a tied head may be left out). With `changed`, only the parts holding one of
        those names (and parts dropped by `release`) are re-fused and re-packed: under LoRA, the adapted
        layers but not the 49k-row head."""

        def stale(*names: str) -> bool:
            return changed is None or any(n in changed for n in names)

        def norm(name: str) -> torch.Tensor:
            return state[name].detach().to(self.dtype)  # the parameter itself when the dtype matches

        self.head_name = "lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"
        with torch.no_grad():
            if stale("model.embed_tokens.weight"):
                self.embed = norm("model.embed_tokens.weight")
            if stale("model.norm.weight"):
                self.final_norm = norm("model.norm.weight")
            if self.head is None or stale(self.head_name):
                self.head = self._linear([state[self.head_name]], [None])
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                if stale(p + "input_layernorm.weight", p + "post_attention_layernorm.weight"):
                    layer.input_norm = norm(p + "input_layernorm.weight")
                    layer.post_norm = norm(p + "post_attention_layernorm.weight")
                for attr, members in PROJECTIONS.items():
                    weights = [f"{p}{m}.weight" for m in members]
                    biases = [f"{p}{m}.bias" for m in members]
                    if getattr(layer, attr) is None or stale(*weights, *biases):
                        linear = self._linear([state[w] for w in weights], [state.get(b) for b in biases])
                        setattr(layer, attr, linear)

    def release(self, changed: set[str] | None = None) -> None:
        """Drop the packed projections that the next `load(state, changed)` rebuilds anyway (under LoRA the
        adapted layers, all of them under full fine-tuning), so the training pass reuses their memory."""
        for i, layer in enumerate(self.layers):
            for attr, members in PROJECTIONS.items():
                if changed is None or any(f"model.layers.{i}.{m}.weight" in changed for m in members):
                    setattr(layer, attr, None)
        if changed is None or self.head_name in changed:
            self.head = None

    # ------------------------------------------------------------------------------------------- forward

    def _project(self, linear, x: torch.Tensor) -> torch.Tensor:
        if self.pack:
            return linear(x)
        return F.linear(x, *linear)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # as transformers' RMSNorm: the statistics in float32, the scale in the model's dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, L) 1 on real tokens, L = cached + T; None: all
        position_ids: torch.Tensor | None = None,  # (B, T); None: counting on from the cache
        past_key_values: KVBuffers | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,  # 0: logits at every position
    ) -> DecoderOutput:
        B, T = input_ids.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cache = past_key_values if past_key_values is not None else KVBuffers(len(self.layers))
        if attention_mask is None:
            attention_mask = torch.ones(B, cache.length + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(cache.length, cache.length + T, device=input_ids.device).expand(B, T)
        x = F.embedding(input_ids, self.embed)  # (B, T, d)
        cos, sin = self.rotary(x, position_ids)  # (B, T, D) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): shared by all heads
        keep = attention_mask.bool()
        if T == 1:  # a decode step: the G query heads sharing a key head act as G queries (no repeat_kv)
            mask = keep[:, None, None, :]  # (B, 1, 1, L)
        else:  # prefill: causal over the new tokens; a padded query attends to itself, so no row is empty
            L = keep.shape[1]
            causal = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)
            diagonal = torch.arange(L, device=x.device) == torch.arange(T, device=x.device)[:, None] + (L - T)
            mask = (causal & keep[:, None, :]) | diagonal  # (B, T, L)
            mask = mask[:, None]  # (B, 1, T, L)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            qkv = (
                self._project(layer.qkv, h).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
            )  # (B, H + 2Hkv, T, D)
            qk = self._rotate(qkv[:, : H + Hkv], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
            if cache.keys[i] is None:
                cache.allocate(i, k, cache.length + T)
            keys, values = cache.write(i, k, v)  # (B, Hkv, L, D)
            if T == 1:
                out = F.scaled_dot_product_attention(
                    q.reshape(B, Hkv, H // Hkv, D), keys, values, attn_mask=mask
                )
            else:
                out = F.scaled_dot_product_attention(
                    q, keys.repeat_interleave(H // Hkv, dim=1), values.repeat_interleave(H // Hkv, dim=1),
                    attn_mask=mask,
                )  # fmt: skip
            out = out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
            x = x + self._project(layer.o, out)
            h = self._norm(x, layer.post_norm)
            gate, up = self._project(layer.gate_up, h).chunk(2, dim=-1)
            x = x + self._project(layer.down, F.silu(gate) * up)
        cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self._project(self.head, self._norm(x, self.final_norm))
        return DecoderOutput(logits=logits, past_key_values=cache)
