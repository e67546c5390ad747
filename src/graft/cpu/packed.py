"""A linear layer's product for the CPU rollout: oneDNN-packed weights (PackedLinear) where the CPU probe
says they work, F.linear (PlainLinear) otherwise, with the same fused post-ops and the same call shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PackedLinear(torch.nn.Module):
    """An inference-only linear product whose weight lives in oneDNN's blocked layout, packed once per
    refresh. Dense tensors in and out (torch.ops.mkldnn._linear_pointwise, the op inductor's CPU freezing
    emits): torch.utils.mkldnn's modules convert every input to the oneDNN format and every output back,
    which on a 16-row decode step costs more than the multiply (benchmarks/decode_products.py). A module,
    so it can stand in for an nn.Linear inside a transformers model (graft.cpu.sampling)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype, self.bias = dtype, None
        self.pack(weight, bias)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take new weights (and a new bias, when given; LoRA never changes one)."""
        if bias is not None:
            self.bias = bias.detach().to(self.dtype).clone()
        # 16 = the decode batch the layout is tuned for; any batch size gives the same result
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype), 16)

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """linear(x), with oneDNN's fused activation ("swish" = SiLU) when asked."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, activation, [], "")

    def binary(self, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
        """linear(x) * other (op "mul") or linear(x) + other ("add"), fused into the product."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, op)


class PlainLinear:
    """F.linear with the post-ops PackedLinear fuses: the fallback where this CPU cannot pack the dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take new weights, as PackedLinear.pack does (a copy: the policy's parameters stay untouched)."""
        if bias is not None:
            self.bias = bias.detach().to(self.dtype).clone()
        self.weight = weight.detach().to(self.dtype, copy=True)

    def __call__(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return F.silu(y) if activation == "swish" else y

    def binary(self, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y * other if op == "mul" else y + other


def linear_product(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pack: bool):
    """The product for this weight: packed for oneDNN when `pack` (the plan's answer for this CPU)."""
    return PackedLinear(weight, bias, dtype) if pack else PlainLinear(weight, bias, dtype)
