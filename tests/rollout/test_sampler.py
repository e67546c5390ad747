import math

import pytest
import torch

from graft.rollout.sampler import (
    _filter_top_p,
    completion_mask_from_ids,
    left_pad,
    position_ids_from_mask,
    sample,
)
from graft.training.grpo import completion_logprobs

EOS = 2
PROMPTS = [[1, 33, 31, 17, 6, 65, 7], [1, 40, 8], [1, 20, 21, 22, 23]]


def test_completion_mask_stops_after_first_stop_even_when_pad_is_eos():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2], [5, 9, 3, 2]])
    mask, has_stop = completion_mask_from_ids(ids, [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert has_stop.tolist() == [True, False, True, True]


def test_left_pad_and_positions_skip_padding():
    ids, mask = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    kept = _filter_top_p(probs, 0.6)  # 0.5 alone is short of 0.6, 0.5 + 0.3 reaches it
    assert kept.tolist() == [[0.0, 0.5, 0.3]]
    assert _filter_top_p(probs, 0.4).tolist() == [[0.0, 0.5, 0.0]]  # the top token is always kept
    assert _filter_top_p(probs * 4, 0.6).tolist() == [[0.0, 2.0, 1.2]]  # unnormalised mass: same cut


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_hf_generate_with_mixed_prompt_lengths(tiny_model):
    rollout = sample(
        tiny_model, PROMPTS, group_size=1, max_new_tokens=12, pad_id=0, stop_ids=[EOS], greedy=True
    )
    for i, prompt in enumerate(PROMPTS):
        expected = _hf_greedy(tiny_model, prompt, 12)
        n = int(rollout.completion_mask[i].sum())
        assert rollout.completion_ids[i, :n].tolist() == expected[:n]
        assert n == len(expected) or expected[n - 1] == EOS


def test_groups_share_the_prompt_and_sampler_is_seeded(tiny_model):
    kw = dict(group_size=4, max_new_tokens=10, pad_id=0, stop_ids=[EOS], temperature=1.0)
    a = sample(tiny_model, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(tiny_model, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    assert a.completion_ids.shape[0] == 12
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.prompt_ids[0], a.prompt_ids[3]) and not torch.equal(a.prompt_ids[3], a.prompt_ids[4])
    # different samples within a group (a random tiny model spreads its probability widely)
    assert len({tuple(row.tolist()) for row in a.completion_ids[:4]}) > 1
    # a greedy group is G copies of the single greedy completion: the repeated KV cache is right
    greedy_group = sample(
        tiny_model, PROMPTS, group_size=3, max_new_tokens=10, pad_id=0, stop_ids=[EOS], greedy=True
    )
    greedy_one = sample(
        tiny_model, PROMPTS, group_size=1, max_new_tokens=10, pad_id=0, stop_ids=[EOS], greedy=True
    )
    for i in range(3):
        for j in range(3):
            assert torch.equal(greedy_group.completion_ids[3 * i + j], greedy_one.completion_ids[i])


def test_sampler_logprobs_equal_the_training_pass(tiny_model):
    # fp32 on CPU: the cached decode and the full-sequence pass agree to ~1e-6; 1e-4 leaves headroom
    rollout = sample(
        tiny_model, PROMPTS, group_size=3, max_new_tokens=16, pad_id=0, stop_ids=[EOS], temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    with torch.no_grad():
        train_lp = completion_logprobs(
            tiny_model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            0.7,
        )
    mask = rollout.completion_mask.bool()
    assert torch.allclose(train_lp[mask], rollout.logprobs[mask], atol=1e-4)
    assert (rollout.logprobs[~mask] == 0).all()


def test_truncation_flag_and_length_limit(tiny_model):
    rollout = sample(tiny_model, PROMPTS, group_size=2, max_new_tokens=3, pad_id=0, stop_ids=[EOS], temperature=1.0,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert rollout.completion_ids.shape[1] <= 3
    ends_with_stop = torch.isin(rollout.completion_ids, torch.tensor([EOS])).any(1)
    assert torch.equal(rollout.truncated, ~ends_with_stop)
    # a stop token that is every token's most likely successor ends every completion at once
    always_stop = sample(tiny_model, PROMPTS, group_size=1, max_new_tokens=5, pad_id=0,
                         stop_ids=list(range(tiny_model.config.vocab_size)), greedy=True)  # fmt: skip
    assert always_stop.completion_ids.shape[1] == 1
    assert always_stop.completion_lengths.tolist() == [1, 1, 1]
    assert not always_stop.truncated.any()
    assert all(math.isfinite(x) for x in always_stop.logprobs.flatten().tolist())


@pytest.mark.parametrize(
    "block", [1, 2, 4, 1024]
)  # one token per slice, even slices, a ragged tail, one slice
def test_categorical_sampling_matches_the_distribution_and_never_picks_zero_probability(block):
    from graft.rollout.sampler import _sample_categorical

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    draws = _sample_categorical(probs.expand(20000, -1), torch.Generator().manual_seed(0), block=block)
    counts = torch.bincount(draws, minlength=6).float() / 20000
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs, atol=0.015)  # 20k draws: 3 standard errors is about 0.011
    # one certain token, also when it is the last one and alone in the ragged tail
    assert (_sample_categorical(torch.tensor([[0.0, 1.0, 0.0]]), None, block=block) == 1).all()
    assert (_sample_categorical(torch.tensor([[0.0] * 6 + [2.0]]), None, block=block) == 6).all()


def test_categorical_sampling_is_the_inverse_cdf_of_one_uniform():
    """The two-level search picks the same token as a plain search of the full CDF for the same uniform."""
    from graft.rollout.sampler import _sample_categorical

    probs = torch.rand(64, 1000) ** 4  # unnormalised, uneven
    probs[:, ::7] = 0.0
    for block in (3, 64, 1000):
        drawn = _sample_categorical(probs, torch.Generator().manual_seed(5), block=block)
        cdf = probs.cumsum(dim=1, dtype=torch.float64)
        u = torch.rand(64, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * cdf[:, -1:]
        assert torch.equal(drawn, torch.searchsorted(cdf, u, right=True).squeeze(1))
