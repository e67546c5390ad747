"""graft's own sampling forward against the transformers model it replaces."""

import pytest
import torch

from conftest import build_tiny_model, build_tiny_qwen2, require_cpu
from graft.cpu.decoder import Decoder, decoder_problem
from graft.models import merged_state
from graft.rollout.sampler import left_pad, position_ids_from_mask, sample

PROMPTS = [[1, 33, 31, 17, 6, 65, 7], [1, 40, 8], [1, 20, 21, 22, 23]]
VOCAB = 70


MODELS = {"llama": lambda: build_tiny_model(VOCAB), "qwen2": lambda: build_tiny_qwen2(VOCAB)}


def _reference_logits(model, ids, mask):  # (B, L, V): the transformers forward over whole sequences
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


# float32 (time-major cache, batched products) exact up to summation order; bfloat16 (torch's fused
# attention on a (B, H_kv, L, D) cache) a rounded model, so only close
PRECISIONS = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 1e-2)}  # logits here: std ~0.12


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("arch", list(MODELS))
def test_prefill_and_decode_steps_give_the_transformers_logits(arch, pack, precision):
    """Left-padded prefill, the cache repeated for groups, decode steps, rows leaving: at every step the
    logits equal a full forward of the same sequences."""
    dtype, atol = PRECISIONS[precision]
    if pack:  # oneDNN packing needs the CPU's kernels for this dtype; unpacked runs anywhere
        require_cpu("packed_float32" if dtype == torch.float32 else precision)
    model = MODELS[arch]()
    decoder = Decoder(model, merged_state(model)[0], dtype, pack=pack)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    out = decoder(ids, mask, position_ids_from_mask(mask))
    real = mask.bool()
    assert torch.allclose(out.logits[real].float(), _reference_logits(model, ids, mask)[real], atol=atol)

    cache = out.past_key_values
    cache.batch_repeat_interleave(2)
    cache.reserve(ids.shape[1] + 6)
    ids, mask = ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 3:  # rows 1 and 4 finish: they leave the batch and the cache
            keep = torch.tensor([0, 2, 3, 5])
            cache.batch_select_indices(keep)
            ids, mask = ids[keep], mask[keep]
        token = torch.randint(3, VOCAB, (ids.shape[0], 1), generator=generator)
        position = mask.sum(1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        step_logits = decoder(token, mask, position, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        assert torch.allclose(step_logits.float(), _reference_logits(model, ids, mask)[:, -1], atol=atol)


@pytest.mark.parametrize("arch", list(MODELS))
def test_sampling_through_the_decoder_equals_sampling_through_transformers(arch):
    require_cpu("packed_float32")
    model = MODELS[arch]()
    decoder = Decoder(model, merged_state(model)[0], torch.float32, pack=True)
    kw = dict(max_new_tokens=10, pad_id=0, stop_ids=[2, 5, 9])  # stop tokens: rows finish at different steps
    greedy_ref = sample(model, PROMPTS, group_size=1, greedy=True, **kw)
    greedy = sample(decoder, PROMPTS, group_size=1, greedy=True, **kw)
    assert torch.equal(greedy.completion_ids, greedy_ref.completion_ids)
    ref = sample(model, PROMPTS, group_size=3, generator=torch.Generator().manual_seed(4), **kw)
    ours = sample(decoder, PROMPTS, group_size=3, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(ours.completion_ids, ref.completion_ids)  # same uniforms, same distributions
    assert torch.equal(ours.completion_mask, ref.completion_mask)
    assert ours.completion_lengths.unique().numel() > 1  # rows did leave at different steps
    assert torch.allclose(ours.logprobs, ref.logprobs, atol=1e-5)
    assert torch.allclose(ours.entropy, ref.entropy, atol=1e-5)


def test_unsupported_models_are_named_and_left_to_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert decoder_problem(build_tiny_model(VOCAB)) is None
    assert decoder_problem(build_tiny_qwen2(VOCAB)) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert "model type 'gpt2'" in decoder_problem(gpt2)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    windowed = MistralForCausalLM(MistralConfig(sliding_window=16, **small))
    assert decoder_problem(windowed) == "sliding-window attention"
    assert decoder_problem(MistralForCausalLM(MistralConfig(sliding_window=None, **small))) is None
