"""The products of one decode step of the built-in model, as graft's rollout runs them: every layer's five
products (with the post-ops it fuses) and the LM head, each weight read once per step as in a real rollout,
where 0.5 GB of float32 weights cannot stay in cache; 16 rows (2 prompts x G = 8). Prints ms per step and the
weight bytes streamed per second, for oneDNN-packed weights (graft's default on a CPU) and F.linear (its
fallback where the CPU probe finds no packing).

    python benchmarks/decode_products.py                  # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/decode_products.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of each product graft's decoder runs per step: qkv stacked, o, gate, up, down; the head."""
    d, ffn = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    per_layer = [(d, qkv), (config.num_attention_heads * head_dim, d), (d, ffn), (d, ffn), (ffn, d)]
    return per_layer * config.num_hidden_layers + [(d, config.vocab_size)]


def decode_step(linears, rows: int, d: int, attention: int):
    """One decode step's products as graft's decoder calls them (post-ops fused: the residual adds, the
    gate's SiLU and the gating product), on graft.cpu.packed.PackedLinear or the fallback PlainLinear."""
    x, att, h = torch.randn(rows, 1, d), torch.randn(rows, 1, attention), torch.randn(rows, 1, d)
    layers = [linears[i : i + 5] for i in range(0, len(linears) - 1, 5)]

    def run():
        for qkv, o, gate, up, down in layers:
            qkv(h)
            mid = o.binary(att, x, "add")
            down.binary(up.binary(h, gate(h, "swish"), "mul"), mid, "add")
        linears[-1](h)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="decode batch (completions still running)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    from transformers import AutoConfig

    from graft.config import ModelConfig
    from graft.cpu.packed import PackedLinear, PlainLinear
    from graft.cpu.probe import probe
    from graft.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(ModelConfig()))
    shapes = layer_shapes(config)
    weights = [torch.randn(o, k) for k, o in shapes]
    gbytes = sum(w.numel() for w in weights) * 4 / 1e9
    print(f"machine: {probe().summary()}; {torch.get_num_threads()} threads")
    print(f"{len(shapes)} products per decode step, {gbytes:.2f} GB of float32 weights, {args.rows} rows")
    kinds = {"F.linear": lambda w: PlainLinear(w, None, torch.float32)}
    if probe().has("packed_float32"):
        kinds["oneDNN packed"] = lambda w: PackedLinear(w, None, torch.float32)
    for name, make in kinds.items():
        run = decode_step([make(w) for w in weights], args.rows, config.hidden_size, shapes[1][0])
        for _ in range(3):
            run()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        print(f"{name:>14}: {seconds * 1e3:6.1f} ms per step, {gbytes / seconds:5.1f} GB/s of weights")


if __name__ == "__main__":
    main()
