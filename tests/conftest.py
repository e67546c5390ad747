"""Shared fixtures: a tiny random Llama with a character tokenizer, built in the test (no downloads)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

from graft.cpu.probe import FEATURES, FORCE_ENV, probe

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]  # id 0 pad, 2 end of turn
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = string.digits + string.ascii_letters + " +-*=?.,:\n"
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    backend.add_special_tokens(SPECIAL)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, eos_id: int = 2, pad_id: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model.eval()


def build_tiny_qwen2(vocab_size: int):
    """Qwen2's shape: biases on q/k/v only, an untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, use_sliding_window=False)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local model folder, loadable by `model.name=<folder>` like any downloaded model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def builtin_model():
    """The real SmolLM2-135M-Instruct (slow tests only): converted once into the graft cache."""
    from graft.config import ModelConfig
    from graft.models import load_model

    return load_model(ModelConfig(device="cpu"))


def _lacks(feature: str) -> str | None:
    """The skip reason when the CPU probe does not find `feature`: the feature and what the CPU lacks."""
    caps = probe()
    return None if caps.has(feature) else f"needs {feature} ({FEATURES[feature]}); {caps.missing(feature)}"


def needs_cpu(feature: str):
    """A mark: skip unless this CPU has `feature` (graft.cpu.probe)."""
    return pytest.mark.skipif(_lacks(feature) is not None, reason=_lacks(feature) or "")


def require_cpu(feature: str) -> None:
    """Inside a test: skip it unless this CPU has `feature`."""
    if (reason := _lacks(feature)) is not None:
        pytest.skip(reason)


@pytest.fixture
def cpu_without():
    """cpu_without("bfloat16", ...): the probe answers "unsupported" for these features until the test
    ends, so a fallback runs on every machine, whatever the CPU can do."""
    before = os.environ.get(FORCE_ENV)

    def force(*features: str):
        os.environ[FORCE_ENV] = ",".join(features)
        probe.cache_clear()
        return probe()

    yield force
    if before is None:
        os.environ.pop(FORCE_ENV, None)
    else:
        os.environ[FORCE_ENV] = before
    probe.cache_clear()
