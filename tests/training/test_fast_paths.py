"""Each speed optimization gives the same numbers as the plain computation it replaces."""

import copy

import pytest
import torch

from graft.batch import ScoredBatch
from graft.config import LoraConfig, load_config
from graft.models import add_lora, merged_adapter
from graft.rollout.sampler import position_ids_from_mask, sample
from graft.training.grpo import completion_logprobs, frozen_logprobs, prompt_runs, update_policy

PROMPTS = [[1, 33, 31, 17], [1, 40, 8, 9, 10], [1, 5]]


def greedy(model, prompts=PROMPTS, group_size=3, **kw):
    kw.setdefault("stop_ids", [2])
    return sample(model, prompts, group_size=group_size, max_new_tokens=10, pad_id=0, greedy=True, **kw)


@pytest.fixture
def lora_model(tiny_model):
    model = add_lora(tiny_model, LoraConfig(r=4), seed=0)
    with torch.no_grad():  # a trained-looking adapter: B starts at zero, which would hide mistakes
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def naive_logprobs(model, r, temperature):
    """The textbook way: full logits for every position, full log-softmax, then pick."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = r.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : -1] / temperature, -1)
    return logp.gather(-1, r.completion_ids[..., None]).squeeze(-1)


def test_prompt_runs_find_groups():
    ids = torch.tensor([[0, 5], [0, 5], [7, 5], [7, 5], [7, 5], [0, 5]])
    mask = torch.tensor([[0, 1]] * 2 + [[1, 1]] * 3 + [[0, 1]])
    starts, counts = prompt_runs(ids, mask)
    assert starts.tolist() == [0, 2, 5] and counts.tolist() == [2, 3, 1]


@pytest.mark.parametrize("share_prompts", [False, True])
def test_completion_only_lm_head_and_shared_prompts_match_the_naive_pass(lora_model, share_prompts):
    r = greedy(lora_model)
    mask = r.completion_mask.bool()

    def logprobs_and_grad(model, fast: bool):
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        if fast:
            args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.7, share_prompts)
            logprobs = completion_logprobs(model, *args)[mask]
        else:
            logprobs = naive_logprobs(model, r, 0.7)[mask]
        grads = torch.autograd.grad(logprobs.sum(), trained)
        return logprobs.double(), torch.cat([g.double().flatten() for g in grads])

    # Both passes are float32 summing in different orders (shared prompts change the products' shapes, the
    # fused head works over vocabulary blocks), and which order a kernel uses depends on the CPU (AVX-512 or
    # AVX2 blocking), so they are compared with the float64 naive pass, each against its own bound.
    exact, g_exact = logprobs_and_grad(copy.deepcopy(lora_model).double(), fast=False)
    for fast in (True, False):
        logprobs, grad = logprobs_and_grad(lora_model, fast)
        # log-probs here are O(10) nats out of a 70-way softmax: 1e-4 is ~1000 float32 roundoffs (2^-24
        # relative) of them, a mistake (a shifted position, a lost mask) moves one by O(1)
        assert (logprobs - exact).abs().max() < 1e-4
        # the gradient runs back through ~10 chained reductions of up to 64 terms, amplified by the
        # deliberately large adapter (saturated softmaxes): float32 keeps ~1e-4 of its norm on the kernels
        # we ran (2e-5 to 1e-4, AVX2 and AVX-512), so 1e-3 allows 10x that and still catches any real error
        assert (grad - g_exact).norm() <= 1e-3 * g_exact.norm()


def test_merged_adapter_sampling_matches_the_adapter_and_restores_weights(lora_model):
    before = {k: v.clone() for k, v in lora_model.state_dict().items()}
    plain = greedy(lora_model)
    with merged_adapter(lora_model):
        merged = greedy(lora_model)
    assert torch.equal(plain.completion_ids, merged.completion_ids)
    assert torch.allclose(plain.logprobs, merged.logprobs, atol=1e-5)
    after = lora_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights must come back bit for bit"
    assert all(p.requires_grad for n, p in lora_model.named_parameters() if "lora_" in n)


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_model):
    alone = greedy(tiny_model, group_size=1)
    # make prompt 0's second token a stop token: its row finishes at step 2 while the others go on
    stop = int(alone.completion_ids[0, 1])
    stops = [2, stop]
    together = greedy(tiny_model, group_size=1, stop_ids=stops)
    assert int(together.completion_lengths[0]) <= 2
    for i, prompt in enumerate(PROMPTS):
        single = greedy(tiny_model, prompts=[prompt], group_size=1, stop_ids=stops)
        n = int(single.completion_lengths[0])
        assert int(together.completion_lengths[i]) == n
        assert torch.equal(together.completion_ids[i, :n], single.completion_ids[0, :n])
        assert torch.allclose(together.logprobs[i, :n], single.logprobs[0, :n], atol=1e-5)


def test_min_new_tokens_holds_stop_tokens_back(tiny_model):
    all_but_token_5 = [t for t in range(tiny_model.config.vocab_size) if t != 5]
    r = sample(tiny_model, PROMPTS, group_size=2, max_new_tokens=6, min_new_tokens=4, pad_id=0,
               stop_ids=all_but_token_5, greedy=True)  # fmt: skip
    assert (r.completion_ids[:, :4] == 5).all()  # the only token that is not a stop
    assert (r.completion_lengths >= 5).all()  # without min_new_tokens every completion is 1 token long
    assert (sample(tiny_model, PROMPTS, group_size=2, max_new_tokens=6, pad_id=0, stop_ids=all_but_token_5,
                   greedy=True).completion_lengths < 5).any()  # fmt: skip


def test_detached_ratio_at_mu_one_equals_an_explicit_old_logprob_pass(tiny_model):
    r = sample(tiny_model, PROMPTS, group_size=4, max_new_tokens=6, pad_id=0, stop_ids=[2],
               temperature=1.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    cfg = load_config(None, ["train.micro_batch_size=5", "train.max_grad_norm=null"])
    advantages = torch.linspace(-1.0, 1.0, 12)
    results = []
    for explicit in (False, True):
        model = copy.deepcopy(tiny_model)
        old = frozen_logprobs(model, r, cfg, torch.device("cpu")) if explicit else None
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batch = ScoredBatch(r, torch.zeros(12), advantages, old, None)
        stats = update_policy(model, optimizer, scheduler, batch, cfg, torch.device("cpu"), params)
        results.append((stats["loss"], [p.detach().clone() for p in params]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_training_pass_is_close_to_float32(tiny_model):
    """train.autocast=bfloat16 is an approximation, not a fast path: the whole training pass (shared prompts,
    fused head) must stay close to float32: log-probs within bf16 rounding, gradients pointing the same way."""
    model = add_lora(tiny_model, LoraConfig(r=4), seed=0)
    with torch.no_grad():  # an adapter of a trained size (the lora_model fixture's is deliberately huge)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    r = greedy(model)
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.7)

    def logprobs_and_grads(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp = completion_logprobs(model, *args)
        (lp * r.completion_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return lp.detach(), grads

    lp32, g32 = logprobs_and_grads(False)
    lp16, g16 = logprobs_and_grads(True)
    assert lp16.dtype == torch.float32
    diff = (lp16 - lp32)[r.completion_mask.bool()].abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1  # bf16 keeps 8 mantissa bits; log-probs here ~ -4
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.95
