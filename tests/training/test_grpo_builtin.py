"""Two real GRPO steps on the built-in SmolLM2-135M-Instruct (converted from its GGUF once, then cached)."""

import json

import pytest
from safetensors.torch import load_file

from graft.config import load_config
from graft.training.loop import train


@pytest.mark.slow
def test_two_grpo_steps_on_the_builtin_model(tmp_path):
    cfg = load_config(
        None,
        [
            "task.max_operand=9",  # easy problems: the base model gets some right, so groups have signal
            "task.system_prompt='You are a calculator. Reply with the result only, as a plain integer.'",
            "grpo.num_generations=4",
            "generation.max_new_tokens=12",
            "generation.temperature=1.0",
            "train.max_steps=2",
            "train.prompts_per_step=4",
            "train.micro_batch_size=8",
            "train.warmup_steps=0",
            "train.seed=0",
            "eval.num_prompts=8",
            "eval.every_n_steps=0",
            "checkpoint.every_n_steps=1",
            f"logging.output_dir={tmp_path}",
            "logging.run_name=builtin",
            "logging.progress=lines",
        ],
    )
    run = train(cfg)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert sum(1 - m["zero_variance_group_fraction"] for m in steps) > 0, "no group had any learning signal"
    assert all(0 <= m["reward/mean"] <= 1 for m in steps)
    assert all(m["grad_norm"] > 0 for m in steps)

    adapter = load_file(run / "final" / "adapter_model.safetensors")
    moved = [k for k, v in adapter.items() if "lora_B" in k and v.abs().sum() > 0]
    assert moved, "the adapter weights did not change"
    first = load_file(run / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    assert any(not (first[k] == adapter[k]).all() for k in moved), "step 2 did not change the adapter"
    evals = json.loads((run / "eval.json").read_text())
    assert 0 <= evals["before"]["accuracy"] <= 1 and 0 <= evals["after"]["accuracy"] <= 1
