"""The README's memory tables: graft's own estimator (graft validate --gpu-memory [--nproc N]) for the
models our users train, from their published shapes alone (no weights, no network): LoRA on one GPU, and
full fine-tuning sharded over N GPUs (train.fsdp). An estimate until measured on the GPU.

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
FULL = ["lora.enabled=false", *[o for o in RECIPE if not o.startswith(("lora.", "generation.merge"))]]
FSDP_GPUS = (1, 2, 4, 8)  # processes, one per 80 GB GPU; train.fsdp from 2 on


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
        print(f"\nrecipe: {' '.join(RECIPE)}; graft's estimate, not a measurement\n")
        rows = ["| model, full fine-tuning bf16 | " + " | ".join(f"{n} x 80 GB" for n in FSDP_GPUS) + " |"]
        rows.append("|---|" + "---|" * len(FSDP_GPUS))
        for name in SHAPES:
            folder = Path(tmp) / name.split()[0]
            cells = []
            for n in FSDP_GPUS:
                overrides = [f"model.name={folder}", *FULL, f"train.prompts_per_step={max(2, n)}"]
                cfg = load_config(None, overrides + (["train.fsdp=true"] if n > 1 else []))
                est, verdict = plan_for_gpu(cfg, 80e9 / 2**30 * 0.93, world=n)
                cells.append(
                    f"{'fits' if verdict.startswith('fits') else 'no'} ({est.total / 2**30:.0f} GiB)"
                )
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    print(f"\nrecipe: {' '.join(FULL)}, train.fsdp=true on 2 GPUs and more, prompts_per_step = max(2, N); "
          "GiB per GPU, graft's estimate, not a measurement")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
