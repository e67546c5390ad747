"""The update without a second forward: backward through the activations the rollout computed.

At mu = 1 the policy that sampled the batch is the policy being trained, so a training forward would only
compute again what the rollout's forward computed (same weights, same tokens). graft's decoder keeps those
tensors (graft.cpu.decoder.Recording) and this module runs the backward alone, layer by layer from the
LM head down: each product's input gradient and its LoRA factors' gradients by hand (dy @ W for the frozen
weight, four thin products for A and B), the cheap nonlinear parts (RMSNorm, RoPE and attention, the SiLU
gate, the head's log-softmax) by autograd on small graphs rebuilt from the recorded inputs. A step then
costs the rollout, one backward and the head, instead of the rollout, a forward and a backward.

Same math as the two-pass update up to float rounding (the recorded activations come from the packed,
LoRA-merged sampling weights): tests compare the loss and every LoRA gradient with autograd's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from graft import algo
from graft.cpu.decoder import PROJECTIONS, LayerTrace, Recording, causal_mask, rotate
from graft.models import base_linear, lora_factors, lora_variant
from graft.rollout.sampler import Rollout, position_ids_from_mask

PROJECTION_NAMES = tuple(m for members, _ in PROJECTIONS.values() for m in members)  # self_attn.q_proj, ...


def replay_model_problem(policy) -> str | None:
    """Why the loaded `policy`'s updates cannot be replayed, from what only the model shows (which layers
    carry LoRA and of what kind); None when they can. The config's part is graft.cpu.plan's."""
    from peft.tuners.lora import LoraLayer

    allowed = set()
    for name, module in policy.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not name.endswith(PROJECTION_NAMES) or getattr(module, "fan_in_fan_out", False):
            return f"LoRA on {name}"
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            variant = lora_variant(module, adapter)
            if variant is not None:
                return f"a LoRA variant on {name} ({variant})"
            if not isinstance(module.lora_dropout[adapter], torch.nn.Identity):
                return "lora.dropout > 0 (the rollout samples without dropout)"
            allowed |= {id(module.lora_A[adapter].weight), id(module.lora_B[adapter].weight)}
    if any(id(p) not in allowed for p in policy.parameters() if p.requires_grad):
        return "trained parameters other than the projections' LoRA factors"
    return None


# --------------------------------------------------------------------------------------------- pieces


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.requires_grad:
        grad = grad.to(param.dtype)
        param.grad = grad if param.grad is None else param.grad.add_(grad)


def linear_backward(
    module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """dx = dy W + s (dy B) A for y = x W^T + s (x A^T) B^T, from x (N, in) and dy (N, out); adds the active
    LoRA factors' gradients, s dy^T (x A^T) to B's .grad and s (dy B)^T x to A's. A plain nn.Linear gives
    dy W. The products run in `dtype` (x's by default; bfloat16 in a mixed-precision replay, as autocast
    would run them); the factors' gradients are accumulated in their own dtype."""
    dtype = dtype or x.dtype
    x, dy = x.to(dtype), dy.to(dtype)
    dx = dy @ base_linear(module).weight.detach().to(dtype)  # (N, in)
    for A, B, s in lora_factors(module):
        a, b = A.detach().to(dtype), B.detach().to(dtype)
        dy_b = dy @ b  # (N, r)
        _accumulate(B, (dy.T @ (x @ a.T)).mul_(s))  # (out, r)
        _accumulate(A, (dy_b.T @ x).mul_(s))  # (r, in)
        dx.addmm_(dy_b, a, alpha=s)
    return dx


def _through(fn: Callable, x: torch.Tensor, backward: Callable) -> torch.Tensor:
    """dx of a small differentiable piece y = fn(x), given backward(y) -> dy: the graph is rebuilt from x."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        y = fn(leaf)
        (dx,) = torch.autograd.grad(y, leaf, backward(y.detach()).to(y.dtype))
    return dx


def _attention_masks(prompt_mask: torch.Tensor, keep: torch.Tensor, Tc: int):
    """((U, 1, P, P) prompt, (B, 1, Tc, P + Tc) completion) additive float32 masks (0 or -inf; torch's CPU
    attention is faster with these than with booleans), from the decoder's causal masks."""
    masks = causal_mask(prompt_mask, prompt_mask.shape[1]), causal_mask(keep, Tc)
    return tuple(torch.zeros(m.shape).masked_fill_(~m, float("-inf"))[:, None] for m in masks)


# --------------------------------------------------------------------------------------------- backward


class _Replay:
    """The state of one replayed backward: shapes, rotary tables and masks shared by every layer.

    Token-wise tensors are (N, C) with N = U P + n: the U prompts' P positions, then the n completion
    positions the decode calls ran, in call order (call t holds the rows still running at input token t).
    So a completion that stopped early costs nothing past its end, and the products only see real rows;
    attention alone needs the (B, Tc) grid, rebuilt from `cells`.
    """

    def __init__(self, model, rec: Recording, r: Rollout):
        cfg = model.config
        self.model, self.rec, self.G = model, rec, r.group_size
        self.B, T = r.completion_ids.shape
        self.U, self.P = self.B // self.G, r.prompt_ids.shape[1]
        self.Tc = T - 1  # decode calls: the last token is sampled, never fed back
        if len(rec.layers) != T or T < 2:
            raise RuntimeError(f"the recording has {len(rec.layers)} forward calls for {T} completion tokens")
        # each recorded completion position: its row, the index of the token it was fed, its grid cell (n,)
        calls = rec.rows[1:]
        self.row = torch.cat(calls)
        self.step = torch.cat([torch.full((len(rows),), t) for t, rows in enumerate(calls)])
        self.cells = self.row * self.Tc + self.step
        self.H = cfg.num_attention_heads
        self.Hkv = getattr(cfg, "num_key_value_heads", None) or self.H
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)  # (B, P + T)
        positions = position_ids_from_mask(mask)
        prompt_mask = r.prompt_mask[:: self.G]  # (U, P) a group's rows share their prompt
        anchor = rec.final[0]
        self.dtype = anchor.dtype  # the recording's: float32, or bfloat16 for a mixed-precision run
        rotary = model.model.rotary_emb
        # attention runs in float32 even for a bf16 recording: torch's CPU attention backward is slower in
        # bf16 than in float32 at these sizes (benchmarks/NOTES.md), and more exact this way
        prompt_positions, completion_positions = positions[:: self.G, : self.P], positions[:, self.P : -1]
        self.rope_p = [t[:, None] for t in rotary(anchor.float(), prompt_positions)]  # (U, 1, P, D) cos, sin
        self.rope_c = [t[:, None] for t in rotary(anchor.float(), completion_positions)]  # (B, 1, Tc, D)
        self.mask_p, self.mask_c = _attention_masks(prompt_mask, mask[:, :-1], self.Tc)

    def gather(self, prompt: torch.Tensor, per_call: list[torch.Tensor]) -> torch.Tensor:  # (U P + n, C)
        C = prompt.shape[-1]
        return torch.cat([prompt.reshape(-1, C), *(part.reshape(-1, C) for part in per_call)])

    def linear(self, module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        return linear_backward(module, x, dy, self.dtype)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (U, P, C), (n, C)
        n = self.U * self.P
        return x[:n].view(self.U, self.P, -1), x[n:]

    def grid(self, packed: torch.Tensor) -> torch.Tensor:
        """(n, C) completion positions -> (B, Tc, C), zeros where a row had stopped (differentiable)."""
        grid = packed.new_zeros(self.B * self.Tc, packed.shape[-1]).index_put((self.cells,), packed)
        return grid.view(self.B, self.Tc, -1)

    def _heads(self, qkv: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
        n, T, _ = qkv.shape
        H, Hkv = self.H, self.Hkv
        heads = qkv.view(n, T, H + 2 * Hkv, self.D).transpose(1, 2)
        qk = rotate(heads[:, : H + Hkv], *rope)
        return qk[:, :H], qk[:, H:], heads[:, H + Hkv :]

    def attention(self, qkv_p: torch.Tensor, qkv_c: torch.Tensor):
        """(U, P, H D), (n, H D) attention outputs from the projected q/k/v, (U, P, E) and (n, E),
        differentiably. Grid cells past a completion's end hold zeros; no real query attends to them
        (causal), so they receive no gradient."""
        qp, kp, vp = self._heads(qkv_p.float(), self.rope_p)
        qc, kc, vc = self._heads(self.grid(qkv_c.float()), self.rope_c)
        out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self.mask_p, enable_gqa=True)
        keys = torch.cat([kp.repeat_interleave(self.G, dim=0), kc], dim=2)  # (B, Hkv, P + Tc, D)
        values = torch.cat([vp.repeat_interleave(self.G, dim=0), vc], dim=2)
        out_c = F.scaled_dot_product_attention(qc, keys, values, attn_mask=self.mask_c, enable_gqa=True)
        out_c = out_c.transpose(1, 2).reshape(self.B * self.Tc, -1)[self.cells]  # back to the packed rows
        return out_p.transpose(1, 2).flatten(2), out_c

    def attention_backward(self, qkv: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
        """(N, (H + 2 H_kv) D) gradient of the projected q/k/v from the (N, H D) one of the attention output."""
        with torch.enable_grad():
            leaves = [part.detach().requires_grad_() for part in self.split(qkv)]
            outs = self.attention(*leaves)
            grads = torch.autograd.grad(outs, leaves, [d.float() for d in self.split(d_out)])
        return torch.cat([grads[0].flatten(0, 1), grads[1]])

    def layer_backward(self, i: int, dy: torch.Tensor) -> torch.Tensor:
        """The gradient into layer i's input from the gradient of its output, both (N, d); adds the
        layer's LoRA gradients on the way."""
        layer = self.model.model.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        calls = self.rec.layers
        fields = range(len(LayerTrace._fields))
        x, qkv, attention, mid, gate, up = (
            self.gather(calls[0][i][f], [c[i][f] for c in calls[1:]]) for f in fields
        )
        for call in calls:  # the per-call tensors go as soon as they are gathered
            call[i] = None
        # MLP: out = mid + down(silu(gate) * up)
        silu = F.silu(gate)
        d_hidden = self.linear(mlp.down_proj, silu * up, dy)
        d_up = d_hidden * silu
        d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(up), gate)
        del silu, gate, up
        d_mid = dy + _through(
            layer.post_attention_layernorm,
            mid,
            lambda h: self.linear(mlp.gate_proj, h, d_gate).add_(self.linear(mlp.up_proj, h, d_up)),
        )
        del mid
        # attention: mid = x + o(attention(rope(q), rope(k), v)), q/k/v = projections of norm(x)
        d_qkv = self.attention_backward(qkv, self.linear(attn.o_proj, attention, d_mid))
        del qkv, attention
        q_end, k_end = self.H * self.D, (self.H + self.Hkv) * self.D

        def qkv_backward(h: torch.Tensor) -> torch.Tensor:
            dx = self.linear(attn.q_proj, h, d_qkv[:, :q_end])
            dx.add_(self.linear(attn.k_proj, h, d_qkv[:, q_end:k_end]))
            return dx.add_(self.linear(attn.v_proj, h, d_qkv[:, k_end:]))

        return d_mid.add_(_through(layer.input_layernorm, x, qkv_backward))


@torch.no_grad()
def replay_backward(
    policy,
    rec: Recording,
    r: Rollout,
    temperature: float,
    loss_fn: Callable[[torch.Tensor], algo.losses.PolicyLossOutput],
) -> algo.losses.PolicyLossOutput:
    """Add to the LoRA factors' .grad the gradient of loss_fn(log-probs (B, T)) over the whole rollout,
    from the forward the rollout recorded; returns loss_fn's output. Consumes the recording."""
    model = policy.get_base_model()
    replay = _Replay(model, rec, r)
    # the LM head and the loss: hidden states predicting completion token t are the prompt's last
    # position for t = 0 and the output of the decode call fed token t - 1 for t > 0
    mixed = torch.autocast("cpu", dtype=replay.dtype, enabled=replay.dtype != torch.float32)
    with torch.enable_grad(), mixed:  # the LM head's products as the two-pass update runs them
        final = replay.gather(rec.final[0][:, -1:], rec.final[1:]).requires_grad_()  # (U + n, d)
        hidden = model.model.norm(
            torch.cat([final[: replay.U].repeat_interleave(replay.G, dim=0), final[replay.U :]])
        )
        # (B + n,) the completion token each hidden state predicts: (row, position)
        rows = torch.cat([torch.arange(replay.B), replay.row])
        steps = torch.cat([torch.zeros(replay.B, dtype=torch.long), replay.step + 1])
        head = model.get_output_embeddings().weight
        predicted = algo.linear_token_logprobs(
            hidden[None], head, r.completion_ids[rows, steps][None], temperature, chunk_rows=1024
        )[0]
        # (B, T) for the loss; zeros past each completion's end, where its mask is zero
        logprobs = predicted.new_zeros(r.completion_ids.shape).index_put((rows, steps), predicted)
        out = loss_fn(logprobs)
        (d_final,) = torch.autograd.grad(out.loss, final)
    rec.final.clear()
    d_prompt = d_final.new_zeros(replay.U, replay.P, d_final.shape[-1])
    d_prompt[:, -1] = d_final[: replay.U]
    # (N, d) the last layer's output; float32 along the residual stream, as under autocast
    dy = torch.cat([d_prompt.flatten(0, 1), d_final[replay.U :]]).float()
    for i in reversed(range(len(model.model.layers))):
        dy = replay.layer_backward(i, dy)
    rec.layers.clear()
    return out
