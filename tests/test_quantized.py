"""4-bit and 8-bit QLoRA through bitsandbytes on the CPU: loading, gradients, a run that resumes and exports,
and the checks and memory plan that come before loading."""

import json

import pytest
import torch

from graft.config import ConfigError, LoraConfig, ModelConfig, load_config
from graft.models import add_lora, is_quantized, load_model, plain_weight
from graft.rewards import builtin
from graft.training.loop import TrainingInterrupted, train
from graft.validate import check_run, plan_for_gpu

pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is part of graft[dev]")

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",  # bitsandbytes: int8 inputs cast to float16 on the CPU, kernels package absent
    "ignore::FutureWarning",
)


def linear_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight") and n.endswith("_proj")}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lora_gradients_on_a_quantized_base_equal_those_on_its_dequantized_weights(tiny_model_dir, kind):
    """A rollout first (eval mode, no gradients: bitsandbytes may repack the weights for inference then),
    then the training pass. Its LoRA gradients must be those of a plain model holding the de-quantized
    weights: same weights, same float32 products, so only summation order differs (~1e-6 relative)."""
    from transformers import AutoModelForCausalLM

    quantized, _ = load_model(ModelConfig(name=str(tiny_model_dir), quantization=kind, device="cpu"))
    assert is_quantized(quantized)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain_layers = linear_layers(plain)
        for name, layer in linear_layers(quantized).items():
            plain_layers[name].weight.copy_(plain_weight(layer))
    models = [add_lora(m, LoraConfig(r=4), seed=0) for m in (quantized, plain)]
    ids = torch.randint(3, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in models:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # B starts at zero; make the adapter's path count in the gradient
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model.eval()
        with torch.no_grad():
            model(ids)  # the rollout
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 7  # layers x (A, B) x targets
    for name, g in grads[0].items():
        # the LoRA A factors of the first layer see gradients that crossed every quantized layer above
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name


def _digit_share(prompts, completions, **_):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def qlora_config(model_dir, out_dir, name, *overrides):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "model.quantization=4bit",
            "rewards.functions=[digit_share]",
            "task.num_train=12",
            "task.num_eval=4",
            "grpo.num_generations=3",
            "generation.max_new_tokens=6",
            "train.max_steps=3",
            "train.prompts_per_step=2",
            "train.learning_rate=0.01",
            "train.deterministic=true",
            "checkpoint.every_n_steps=1",
            f"logging.output_dir={out_dir}",
            f"logging.run_name={name}",
            "logging.progress=lines",
            "logging.print_config=false",
            "gate.enabled=false",
            *overrides,
        ],
    )


def test_a_4bit_qlora_run_trains_resumes_evaluates_and_exports(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from graft.exporter import export_merged
    from graft.inference import resolve_target

    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "digit_share", _digit_share)
    straight = train(qlora_config(tiny_model_dir, tmp_path, "straight"))
    assert "model.quantization=4bit" in capsys.readouterr().out  # the start line says which paths are off
    with pytest.raises(TrainingInterrupted):
        train(qlora_config(tiny_model_dir, tmp_path, "resumed"), stop_after=2)
    resumed = train(qlora_config(tiny_model_dir, tmp_path, "resumed", "resume=auto"))

    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume in 4-bit too
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained (B starts at zero)
    assert set(json.loads((straight / "eval.json").read_text())) >= {"before", "after"}

    report = export_merged(resolve_target(str(straight), None, []), tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float model, loadable without bitsandbytes
    # merged into the de-quantized weights the adapter trained against: float32 reordering only
    assert report["parity_max_abs_logprob_diff"] <= 1e-3


def test_quantization_needs_lora_and_bitsandbytes_and_says_how(tiny_model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="lora.enabled=true"):
        load_config(None, ["model.quantization=4bit", "lora.enabled=false"])

    import graft.models

    real = graft.models.importlib.util.find_spec
    monkeypatch.setattr(
        graft.models.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    problems, _ = check_run(load_config(None, [f"model.name={tiny_model_dir}", "model.quantization=8bit"]))
    assert any("pip install 'graft[quant]'" in p and "model.quantization" in p for p in problems)


PHI4 = dict(  # Phi-4's published shape (microsoft/phi-4 config.json): 14.7B parameters
    architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=5120, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=10, intermediate_size=17920, vocab_size=100352,
    tie_word_embeddings=False, max_position_embeddings=16384,
)  # fmt: skip


def test_the_memory_plan_says_phi4_fits_a_24gb_gpu_in_4bit_and_not_in_bf16(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PHI4))
    common = [f"model.name={tmp_path}", "generation.max_new_tokens=512", "grpo.num_generations=8"]
    common += [
        "train.gradient_checkpointing=true",
        "train.micro_batch_size=4",
        "generation.merge_adapter=false",
    ]
    bf16, verdict16 = plan_for_gpu(load_config(None, common), 24)
    q4, verdict4 = plan_for_gpu(load_config(None, [*common, "model.quantization=4bit"]), 24)
    assert verdict16.startswith("does not fit") and "model.quantization=4bit" in verdict16
    assert verdict4.startswith("fits")
    # bf16: 2 bytes a weight; NF4 + double quantization ~0.516 bytes a linear weight, embeddings and head
    # (2 x 100352 x 5120) stay in bf16
    n = bf16.parts["weights"] / 2
    linear = 40 * (5120 * (5120 + 2 * 1280) + 5120 * 5120 + 3 * 5120 * 17920)
    assert n == pytest.approx(14.66e9, rel=0.01)
    assert q4.parts["weights"] == pytest.approx(linear * 0.5157 + (n - linear) * 2, rel=1e-3)


@pytest.mark.slow
def test_the_builtin_model_trains_in_4bit_and_exports_with_parity(tmp_path):
    from graft.exporter import export_merged
    from graft.inference import resolve_target

    cfg = load_config(
        "configs/arithmetic.yaml",
        ["model.quantization=4bit", "train.max_steps=2", "task.num_eval=8", "eval.every_n_steps=0",
         "gate.enabled=false", f"logging.output_dir={tmp_path}", "logging.run_name=q4",
         "logging.progress=lines", "logging.print_config=false"],
    )  # fmt: skip
    run = train(cfg)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert set(json.loads((run / "eval.json").read_text())) == {"before", "after"}
    report = export_merged(resolve_target(str(run), None, []), tmp_path / "merged")
    assert report["parity_max_abs_logprob_diff"] <= 1e-3  # measured 1.0e-5 nats (float32 merge)
