"""Export a Llama-family Hugging Face folder (config.json + safetensors + tokenizer.json) to one GGUF file.

A compact, Llama-only counterpart of llama.cpp's convert_hf_to_gguf.py, written against the `gguf`
package's `GGUFWriter`. The key names and tensor layout mirror what llama.cpp writes for SmolLM2.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

_ARCH = gguf.MODEL_ARCH.LLAMA
_DTYPES = {  # name -> (torch dtype the 2-D weights are stored in, GGML type, llama.cpp file type)
    "f32": (torch.float32, gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (torch.float16, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (torch.bfloat16, gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# llama.cpp picks its pre-tokenizer split regex by name, not from tokenizer.json, so we recognise the
# byte-level layouts whose split we know and refuse the rest rather than tokenize silently differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFExportError(ValueError):
    """The model folder cannot be exported to GGUF (unsupported architecture, tokenizer or settings)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise GGUFExportError(f"{path.name} not found in {path.parent}") from e


def _llama_config(model_dir: Path) -> Any:
    raw = _read_json(model_dir / "config.json")
    archs = raw.get("architectures") or [raw.get("model_type", "unknown")]
    if "LlamaForCausalLM" not in archs:
        raise GGUFExportError(
            f"cannot export architecture {', '.join(map(str, archs))} to GGUF: only Llama-family models "
            "(LlamaForCausalLM) can be exported to GGUF for now; convert the merged safetensors folder "
            f"{model_dir} with llama.cpp's convert_hf_to_gguf.py instead"
        )
    from transformers import LlamaConfig  # fills defaults and normalises rope settings across versions

    cfg = LlamaConfig.from_pretrained(model_dir)
    if cfg.hidden_act != "silu":  # llama.cpp's llama graph hard-codes SiLU
        raise GGUFExportError(
            f"hidden_act {cfg.hidden_act!r} is not supported: llama.cpp's llama is silu only"
        )
    return cfg


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta + rope_scaling.
    params = getattr(cfg, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_theta": cfg.rope_theta, **(getattr(cfg, "rope_scaling", None) or {})}


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors (llama.cpp's rope_freqs tensor) equivalent to HF's "llama3" rope scaling."""
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old_ctx, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)  # the band between the two cut-offs
    factors = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, factors))
    return factors.astype(np.float32)


def _add_hparams(w: gguf.GGUFWriter, cfg: Any, name: str) -> np.ndarray | None:
    """Writes the llama.* keys; returns the rope_freqs tensor when the rope scaling needs one."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = _rope_parameters(cfg)
    w.add_name(name)
    w.add_type("model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:  # llama.cpp assumes hidden/heads otherwise
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3":  # llama.cpp reads llama3 scaling as per-frequency factors, not keys
        return _llama3_rope_factors(rope, head_dim)
    elif kind != "default":
        raise GGUFExportError(
            f"rope scaling {kind!r} is not supported by the GGUF export (default, linear, llama3)"
        )
    return None


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds, last = [s.get("type") for s in steps], steps[-1] if steps else {}
    # llama.cpp's BPE never adds a prefix space (add_space_prefix is for sentencepiece), so refuse those.
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"  # llama.cpp spells this pre-tokenizer with a hyphen
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return "smollm"  # one token per digit, then the GPT-2 split
        if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise GGUFExportError(
        f"unsupported pre-tokenizer {kinds} in tokenizer.json (gpt2, smollm or llama3 only)"
    )


def _add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer

    spec = _read_json(model_dir / "tokenizer.json")
    model, decoder = spec.get("model", {}), (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise GGUFExportError(
            "only GPT-2-style byte-level BPE tokenizers can be exported to GGUF for now "
            f"(tokenizer.json has a {model.get('type')} model and a {decoder} decoder)"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    # The embedding may be padded past the tokenizer, and llama.cpp wants one entry per row. Special added
    # tokens are CONTROL (never produced from plain text); other added tokens are matched whole, as in HF.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    for i, added_token in tok.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added_token.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    has_cfg = (model_dir / "tokenizer_config.json").exists()
    tok_cfg = _read_json(model_dir / "tokenizer_config.json") if has_cfg else {}
    model_cfg = _read_json(model_dir / "config.json")
    ids: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        text = tok_cfg.get(f"{kind}_token")
        text = text.get("content") if isinstance(text, dict) else text
        fallback = model_cfg.get(f"{kind}_token_id")  # a list for some multi-EOS models: llama.cpp takes one
        token_id = tok.token_to_id(text) if text else fallback[0] if isinstance(fallback, list) else fallback
        if token_id is not None:
            ids[kind] = token_id
            getattr(w, f"add_{kind}_token_id")(token_id)
    # The post-processor decides what encode() adds around the text; ask it rather than parse its JSON.
    bare, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    extra = len(full) > len(bare)
    w.add_add_bos_token(extra and full[0] == ids.get("bos"))
    w.add_add_eos_token(extra and full[-1] == ids.get("eos"))
    w.add_add_space_prefix(False)  # checked in _pre_tokenizer_name
    # transformers 5 saves the template next to the tokenizer; 4.x inside tokenizer_config.json.
    template = tok_cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        w.add_chat_template(template)


def _load(file: Path, hf_name: str, n_head: int) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        t = f.get_tensor(hf_name).float()
    if not n_head:
        return t
    # HF keeps each rotary head's rows as [first halves | second halves]; llama.cpp's rope wants the pairs
    # interleaved, so each head goes from (2, head_dim/2) to (head_dim/2, 2) row order (q: heads, k: kv heads).
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _tensor_plan(model_dir: Path, cfg: Any) -> list[tuple[str, list[int], Callable[[], torch.Tensor]]]:
    """(gguf name, shape, loader) per tensor, from the safetensors headers only: nothing is read yet."""
    files = sorted(model_dir.glob("model*.safetensors"))  # save_pretrained's names; not adapter_model.*
    if not files:
        raise GGUFExportError(f"no model*.safetensors in {model_dir}: save it with save_pretrained first")
    names = gguf.get_tensor_name_map(_ARCH, cfg.num_hidden_layers)
    heads = {".q_proj.": cfg.num_attention_heads, ".k_proj.": cfg.num_key_value_heads}
    plan = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from the rope keys
                    continue
                if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:  # llama.cpp reuses token_embd
                    continue
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"tensor {hf_name} has no llama.cpp name (unmerged adapter?)")
                n_head = next((n for part, n in heads.items() if part in hf_name), 0)
                plan.append((name, f.get_slice(hf_name).get_shape(), partial(_load, file, hf_name, n_head)))
    if not cfg.tie_word_embeddings and not any(p[0] == "output.weight" for p in plan):
        raise GGUFExportError("config says untied embeddings but there is no lm_head.weight")
    return plan


def write_gguf(model_dir: Path, out_file: Path, dtype: str = "f16") -> Path:
    """Writes `model_dir` (a Llama HF folder) to the GGUF file `out_file`, atomically; returns out_file.

    dtype ("f32", "f16", "bf16") applies to the 2-D weights; norms and biases stay f32 as llama.cpp wants.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    if dtype not in _DTYPES:
        raise GGUFExportError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if not out_file.parent.is_dir():
        raise GGUFExportError(f"output folder {out_file.parent} does not exist")
    target, ggml_type, file_type = _DTYPES[dtype]
    cfg = _llama_config(model_dir)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_ARCH])
    rope_freqs = _add_hparams(writer, cfg, model_dir.name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_dir, cfg.vocab_size)
    plan = _tensor_plan(model_dir, cfg)
    if rope_freqs is not None:
        plan.insert(0, ("rope_freqs.weight", list(rope_freqs.shape), partial(torch.from_numpy, rope_freqs)))
    # Declare every tensor up front, then stream them one at a time: peak memory is one tensor, not the model.
    # 1-D tensors (norms, biases) stay f32: llama.cpp computes with them in f32 and they are tiny.
    dtypes = [torch.float32 if len(shape) < 2 else target for _, shape, _ in plan]
    for (name, shape, _), dt in zip(plan, dtypes, strict=True):
        kind = gguf.GGMLQuantizationType.F32 if dt == torch.float32 else ggml_type
        # raw_dtype (kind) fixes the GGML type, so the numpy dtype argument is only a placeholder
        writer.add_tensor_info(name, shape, np.float32, math.prod(shape) * torch.finfo(dt).bits // 8, kind)

    # A sibling temp name (same filesystem, so os.replace is atomic); GGUFWriter creates it with the umask.
    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (name, _, load), dt in zip(plan, dtypes, strict=True):
            t = load().to(dt).contiguous()
            data = t.view(torch.uint16).numpy() if dt == torch.bfloat16 else t.numpy()  # numpy has no bf16
            if dt == torch.float16 and not np.isfinite(data).all():
                raise GGUFExportError(f"{name} overflows f16; export with dtype='bf16' or 'f32'")
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out_file)  # readers never see a half-written GGUF under the final name
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file
