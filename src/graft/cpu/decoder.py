"""graft's own sampling forward for Llama-shaped causal LMs (Llama, SmolLM, Qwen2, Mistral without a
sliding window), used by the rollout in place of the transformers modeling code.

Why: a CPU decode step of the generic modeling code spends a good part of its time outside the matrix
products (keyword plumbing, a mask built per step, a cache that is copied to grow, seven module calls
and a dozen small ops per layer). Here a layer is five products on oneDNN-packed weights (q/k/v stacked
into one; o, gate, up, down) with the RMSNorm scales folded into the weights and the SiLU, the gating
product and both residual adds fused into the products as oneDNN post-ops; the rotary tables come from
the model's own rotary module (so every RoPE scaling variant it knows is honoured); keys and values go
into buffers reserved once per rollout. Same math as the transformers forward up to summation order:
tests compare its logits with the model's and its samples with the transformers-driven sampler.
Inference only, no autograd.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from graft.cpu.packed import linear_product
from graft.models import base_linear
from graft.rollout.buffers import ReservedBuffer

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def config_problem(cfg) -> str | None:
    """Why a model with this transformers config cannot use the Decoder; None if its config allows it."""
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type '{cfg.model_type}' (graft's decoder knows {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}'"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
        getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    ):
        return "sliding-window attention"
    return None


def decoder_problem(model) -> str | None:
    """Why `model` (a transformers causal LM, LoRA layers allowed) cannot use the Decoder; None if it can."""
    problem = config_problem(model.config)
    if problem:
        return problem
    body = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or any(not hasattr(body, name) for name in needed):
        return "an unexpected module layout"
    head = model.get_output_embeddings()
    if base_linear(head) is None or getattr(head, "bias", None) is not None:
        return "an LM head that is not a plain linear layer"
    for layer in body.layers:
        modules = [
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ]
        if any(base_linear(m) is None for m in modules):
            return "projections that are not plain linear layers"
    return None


class KVBuffers:
    """Every layer's keys and values (graft.rollout.buffers.ReservedBuffer, growing in place), filled up to
    `length` positions; the cache object the decoder returns. Rows leave (batch_select_indices) as their
    completions finish.

    float32 buffers are time-major, (capacity, B, H_kv, D): the filled part is then one block that a decode
    step's batched products read in place (from a (B, H_kv, capacity, D) buffer, attention copies the
    strided filled part first). Other dtypes keep (B, H_kv, capacity, D) for torch's fused attention,
    which beats batched products there."""

    def __init__(self, num_layers: int, time_major: bool, batch_size: int):
        self.keys: list[ReservedBuffer | None] = [None] * num_layers
        self.values: list[ReservedBuffer | None] = [None] * num_layers
        self.length = 0
        self.time_major = time_major
        self.t, self.b = (0, 1) if time_major else (2, 0)  # the time and batch dimensions of a buffer
        self.rows = torch.arange(batch_size)  # each cache row's index in the batch it was last expanded to

    def _layout(self, x: torch.Tensor) -> torch.Tensor:  # (B, H_kv, T, D) -> the buffer's layout
        return x.permute(2, 0, 1, 3) if self.time_major else x

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, T, D) keys and values at `length`; the filled part of the layer's buffers."""
        key, value = self._layout(key), self._layout(value)
        if self.keys[layer] is None:
            self.keys[layer] = ReservedBuffer(key, self.t, self.b)
            self.values[layer] = ReservedBuffer(value, self.t, self.b)
            return self.keys[layer].filled, self.values[layer].filled
        return self.keys[layer].append(key), self.values[layer].append(value)

    def _buffers(self) -> list[ReservedBuffer]:
        return [buffer for buffer in (*self.keys, *self.values) if buffer is not None]

    def reserve(self, capacity: int) -> None:
        """Room for `capacity` positions in every layer, so no decode step reallocates."""
        for buffer in self._buffers():
            buffer.reserve(capacity)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for buffer in self._buffers():
            buffer.repeat_rows(repeats)
        self.rows = torch.arange(len(self.rows) * repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for buffer in self._buffers():
            buffer.select_rows(indices)
        self.rows = self.rows[indices.cpu()]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (rotate_half convention): x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def causal_mask(keep: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T, L) boolean: the last T of L positions as queries, each seeing the real tokens (keep (B, L)) up
    to itself, and always itself, so no softmax row is empty (a padded query attends to itself)."""
    L = keep.shape[1]
    causal = torch.ones(T, L, dtype=torch.bool, device=keep.device).tril(L - T)
    diagonal = torch.arange(L, device=keep.device) == torch.arange(T, device=keep.device)[:, None] + (L - T)
    return (causal & keep.bool()[:, None, :]) | diagonal


class LayerTrace(NamedTuple):
    """A layer's tensors from one forward call, each (b, T, C): the inputs of its products and what the
    backward of its attention and gating needs. The residual stream in (x) and after attention (mid)."""

    x: torch.Tensor  # (b, T, d)
    qkv: torch.Tensor  # (b, T, (H + 2 H_kv) D) before RoPE
    attention: torch.Tensor  # (b, T, H D) the o product's input
    mid: torch.Tensor  # (b, T, d)
    gate: torch.Tensor  # (b, T, ffn) before SiLU
    up: torch.Tensor  # (b, T, ffn)


@dataclass
class Recording:
    """Every forward call of a rollout, kept for graft.cpu.replay (backward without a second forward).
    The first call is the prefill, one row per prompt; each later call is a decode step over the rows
    still running (`rows`: their indices in the completion batch). No copies: these are the tensors the
    forward made anyway, only kept alive."""

    rows: list[torch.Tensor] = field(default_factory=list)  # per call: (b,) batch rows
    layers: list[list[LayerTrace]] = field(default_factory=list)  # per call, per layer
    final: list[torch.Tensor] = field(default_factory=list)  # per call: (b, T', d) residual into the head


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, V)
    past_key_values: KVBuffers


# a layer's products, the transformers projections stacked into each, and the RMSNorm whose scale is
# folded into its weight columns: W @ (w * x_hat) = (W * w) @ x_hat, one multiplication fewer per norm
PROJECTIONS = {
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    "o": (("self_attn.o_proj",), None),
    "gate": (("mlp.gate_proj",), "post_attention_layernorm"),
    "up": (("mlp.up_proj",), "post_attention_layernorm"),
    "down": (("mlp.down_proj",), None),
}


class _Layer:
    def __init__(self):
        self.qkv = self.o = self.gate = self.up = self.down = None


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
        self.embed = self.head = None
        self.recording: Recording | None = None  # set by graft.cpu.replay's rollouts
        self.load(state)

    # ------------------------------------------------------------------------------------------- weights

    def _linear(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], scale=None):
        """One product for the stacked weights (and biases), their columns times `scale` (a norm's)."""
        weight = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        if scale is not None:  # folded in float32, rounded once; in place when cat made a new tensor
            fold = weight.mul_ if len(weights) > 1 and weight.dtype == torch.float32 else weight.float().mul
            weight = fold(scale.detach().float())
        weight = weight.to(self.dtype)  # packing copies, so a parameter passed through stays untouched
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b.detach() if b is not None else w.new_zeros(w.shape[0])
                    for w, b in zip(weights, biases, strict=True)
                ]
            ).to(self.dtype)
        return linear_product(weight, bias, self.dtype, self.pack)

    def load(self, state: dict[str, torch.Tensor], changed: set[str] | None = None) -> None:
        """Take weights named as in the plain transformers model (model.layers.0.self_attn.q_proj.weight,
        ..., lm_head.weight; a tied head may be left out). With `changed`, only the products holding one
        of those names (and those dropped by `release`) are rebuilt: under LoRA, the adapted layers but
        not the 49k-row head."""

        def stale(*names: str) -> bool:
            return changed is None or any(n in changed for n in names)

        self.head_name = "lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"
        with torch.no_grad():
            if stale("model.embed_tokens.weight"):
                self.embed = state["model.embed_tokens.weight"].detach().to(self.dtype)  # no copy in fp32
            if self.head is None or stale(self.head_name, "model.norm.weight"):
                self.head = self._linear([state[self.head_name]], [None], state["model.norm.weight"])
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                for attr, (members, norm) in PROJECTIONS.items():
                    weights = [f"{p}{m}.weight" for m in members]
                    biases = [f"{p}{m}.bias" for m in members]
                    norms = [f"{p}{norm}.weight"] if norm else []
                    if getattr(layer, attr) is None or stale(*weights, *biases, *norms):
                        scale = state[norms[0]] if norms else None
                        weight_list, bias_list = [state[w] for w in weights], [state.get(b) for b in biases]
                        setattr(layer, attr, self._linear(weight_list, bias_list, scale))

    def release(self, changed: set[str] | None = None) -> None:
        """Drop the packed products that the next `load(state, changed)` rebuilds anyway (under LoRA the
        adapted layers, all of them under full fine-tuning), so the training pass reuses their memory."""
        for i, layer in enumerate(self.layers):
            for attr, (members, _) in PROJECTIONS.items():
                if changed is None or any(f"model.layers.{i}.{m}.weight" in changed for m in members):
                    setattr(layer, attr, None)
        if changed is None or self.head_name in changed:
            self.head = None

    # ------------------------------------------------------------------------------------------- forward

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' RMSNorm without its scale (folded into the next product): statistics in float32
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, L) 1 on real tokens, L = cached + T; None: all
        position_ids: torch.Tensor | None = None,  # (B, T); None: counting on from the cache
        past_key_values: KVBuffers | None = None,
        use_cache: bool = True,  # the transformers signature; the cache is always kept
        logits_to_keep: int = 0,  # 0: logits at every position
    ) -> DecoderOutput:
        B, T = input_ids.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        time_major = self.dtype == torch.float32
        cache = past_key_values if past_key_values is not None else KVBuffers(len(self.layers), time_major, B)
        traces = None
        if self.recording is not None:
            traces = []
            self.recording.rows.append(cache.rows)
            self.recording.layers.append(traces)
        if attention_mask is None:
            attention_mask = torch.ones(B, cache.length + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(cache.length, cache.length + T, device=input_ids.device).expand(B, T)
        x = F.embedding(input_ids, self.embed)  # (B, T, d)
        cos, sin = self.rotary(x, position_ids)  # (B, T, D) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): shared by all heads
        keep = attention_mask.bool()  # (B, L)
        L, group = keep.shape[1], H // Hkv
        if T == 1:  # a decode step: the G query heads sharing a key head act as G queries (no repeat_kv)
            mask = keep[:, None, None, :]  # (B, 1, 1, L); every row sees at least its own new token
            if cache.time_major:  # as an additive bias for the batched products
                bias = torch.zeros(B, H, L, dtype=x.dtype, device=x.device)
                bias = bias.masked_fill_(~keep[:, None, :], float("-inf")).view(B * Hkv, group, L)
        else:  # prefill: causal over the new tokens
            mask = causal_mask(keep, T)[:, None]  # (B, 1, T, L)
        for i, layer in enumerate(self.layers):
            projected = layer.qkv(self._norm(x))  # (B, T, (H + 2Hkv) D)
            qkv = projected.view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2Hkv, T, D)
            qk = rotate(qkv[:, : H + Hkv], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
            keys, values = cache.write(i, k, v)
            if T == 1 and cache.time_major:  # (B Hkv, G, D) x (B Hkv, L, D), read in place from the buffer
                keys = keys.view(L, B * Hkv, D).transpose(0, 1)
                values = values.view(L, B * Hkv, D).transpose(0, 1)
                scores = torch.baddbmm(
                    bias, q.reshape(B * Hkv, group, D), keys.transpose(1, 2), alpha=D**-0.5
                )
                out = torch.bmm(torch.softmax(scores, dim=-1), values)  # (B Hkv, G, D)
                out = out.view(B, H, T, D)
            else:
                if cache.time_major:
                    keys, values = keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)  # (B, Hkv, L, D)
                if T == 1:
                    out = F.scaled_dot_product_attention(
                        q.reshape(B, Hkv, group, D), keys, values, attn_mask=mask
                    )
                else:
                    keys, values = (
                        keys.repeat_interleave(group, dim=1),
                        values.repeat_interleave(group, dim=1),
                    )
                    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            out = out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
            mid = layer.o.binary(out, x, "add")  # the residual add fused into the product
            h = self._norm(mid)
            if traces is None:
                x = layer.down.binary(layer.up.binary(h, layer.gate(h, "swish"), "mul"), mid, "add")
            else:  # the backward needs the gate before its SiLU: no fused activation
                gate, up = layer.gate(h), layer.up(h)
                traces.append(LayerTrace(x, projected, out, mid, gate, up))
                x = layer.down.binary(F.silu(gate).mul_(up), mid, "add")
        cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if self.recording is not None:
            self.recording.final.append(x)
        return DecoderOutput(logits=self.head(self._norm(x)), past_key_values=cache)
