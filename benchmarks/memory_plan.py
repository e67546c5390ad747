"""The README's memory table: graft's own estimator (graft validate --gpu-memory) for the models our users
train, from their published shapes alone (no weights, no network). An estimate until measured on the GPU.

    python benchmarks/memory_plan.py            # prints a Markdown table
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from graft.config import load_config
from graft.validate import plan_for_gpu

# config.json fields that size a model (from each model's config.json on the hub)
SHAPES = {
    "Qwen2.5-3B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=2048,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768),
    "Qwen3-4B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=40960),
    "Phi-4 (14B)": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=5120,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                        intermediate_size=17920, vocab_size=100352, tie_word_embeddings=False,
                        max_position_embeddings=16384),
}  # fmt: skip
RECIPE = [  # LoRA r16 on every linear layer, G = 8, 512 new tokens, the GPU settings the README recommends
    "lora.r=16",
    "grpo.num_generations=8",
    "train.prompts_per_step=2",
    "generation.max_new_tokens=512",
    "train.gradient_checkpointing=true",
    "train.micro_batch_size=4",
    "generation.merge_adapter=false",
]
GPUS = (16, 24, 80)


def main() -> int:
    rows = ["| model | weights | estimate (GiB) | " + " | ".join(f"{g} GB" for g in GPUS) + " |"]
    rows.append("|---|---|---|" + "---|" * len(GPUS))
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            folder = Path(tmp) / name.split()[0]
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(shape))
            for quant, label in (("none", "bf16"), ("4bit", "4-bit NF4")):
                cfg = load_config(None, [f"model.name={folder}", f"model.quantization={quant}", *RECIPE])
                verdicts = []
                for gib in GPUS:
                    # a GPU sold as N GB has about N * 0.93 GiB usable
                    est, verdict = plan_for_gpu(cfg, gib * 1e9 / 2**30 * 0.93)
                    verdicts.append("fits" if verdict.startswith("fits") else "no")
                rows.append(f"| {name} | {label} | {est.total / 2**30:.1f} | " + " | ".join(verdicts) + " |")
    print("\n".join(rows))
    print(f"\nrecipe: {' '.join(RECIPE)}; graft's estimate, not a measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
