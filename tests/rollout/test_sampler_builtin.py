"""The sampler against transformers' own generate and against the training pass, on the built-in model."""

import pytest
import torch

from graft.config import TaskConfig
from graft.evaluation import encode_prompts
from graft.models import stop_token_ids
from graft.rollout.sampler import sample
from graft.tasks import build_task
from graft.training.grpo import completion_logprobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(builtin_model):
    _, tokenizer = builtin_model
    task = build_task(TaskConfig(system_prompt="You are a calculator. Reply with the result only."))
    # different lengths, so left padding is exercised
    problems = [task.eval[0], task.eval[1], task.eval[2]]
    problems[2] = type(problems[2])(prompt="What is 7 + 5? Think it through step by step.", answer="12")
    return encode_prompts(tokenizer, task, problems)


def test_greedy_equals_hf_generate_token_for_token(builtin_model, prompts):
    model, tokenizer = builtin_model
    stops = stop_token_ids(model, tokenizer)
    ours = sample(model, prompts, group_size=1, max_new_tokens=40, pad_id=tokenizer.pad_token_id,
                  stop_ids=stops, greedy=True)  # fmt: skip
    for i, prompt in enumerate(prompts):
        hf = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=40, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt):].tolist()  # fmt: skip
        n = int(ours.completion_lengths[i])
        assert ours.completion_ids[i, :n].tolist() == hf[:n]
        assert n == len(hf)  # both stop at the same EOS (or both hit the limit)


def test_sampler_logprobs_equal_training_logprobs(builtin_model, prompts):
    model, tokenizer = builtin_model
    r = sample(model, prompts, group_size=4, max_new_tokens=24, pad_id=tokenizer.pad_token_id,
               stop_ids=stop_token_ids(model, tokenizer), temperature=0.8,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        train_lp = completion_logprobs(
            model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.8
        )
    mask = r.completion_mask.bool()
    # fp32 on CPU: incremental decoding vs one full pass differ by summation order only (measured 3e-5 nats)
    assert (train_lp[mask] - r.logprobs[mask]).abs().max().item() < 1e-4


def test_packed_sampling_copy_decodes_like_the_model(builtin_model, prompts):
    """generation.pack_weights (on by default on CPU; graft's own decoder for this Llama-shaped model):
    the same greedy tokens, and sampled log-probs that match the training pass as closely as the
    transformers sampler's do."""
    from graft.cpu.decoder import Decoder
    from graft.cpu.sampling import SamplingCopy

    model, tokenizer = builtin_model
    packed = SamplingCopy(model, torch.float32, pack=True).refresh(model)
    assert isinstance(packed, Decoder)
    stops = stop_token_ids(model, tokenizer)
    kw = dict(group_size=1, max_new_tokens=40, pad_id=tokenizer.pad_token_id, stop_ids=stops, greedy=True)
    plain, fast = sample(model, prompts, **kw), sample(packed, prompts, **kw)
    assert torch.equal(plain.completion_ids, fast.completion_ids)

    r = sample(packed, prompts, group_size=4, max_new_tokens=24, pad_id=tokenizer.pad_token_id,
               stop_ids=stops, temperature=0.8, generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        train_lp = completion_logprobs(
            model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.8
        )
    mask = r.completion_mask.bool()
    assert (train_lp[mask] - r.logprobs[mask]).abs().max().item() < 1e-4
