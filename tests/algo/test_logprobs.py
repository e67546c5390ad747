import math

import pytest
import torch

from graft.algo import linear_token_logprobs, token_logprobs


def test_values_match_hand_computed_softmax():
    # logits ln(1), ln(2), ln(5): probabilities 1/8, 2/8, 5/8
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]]]))  # (1, 2, 3)
    out = token_logprobs(logits, torch.tensor([[2, 0]]))
    assert torch.allclose(out, torch.tensor([[math.log(5 / 8), math.log(1 / 8)]]))


def test_temperature_divides_logits():
    # at T = 2 the probabilities are proportional to sqrt(1), sqrt(2), sqrt(5)
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0]]]))
    out = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    expected = math.log(1 / (1 + math.sqrt(2) + math.sqrt(5)))  # -1.53693
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_chunking_does_not_change_values_or_gradients():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    whole = token_logprobs(logits, ids, temperature=0.7)
    (g_whole,) = torch.autograd.grad(whole.sum(), logits)
    chunked = token_logprobs(logits, ids, temperature=0.7, chunk_rows=2)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.allclose(whole, chunked)
    assert torch.allclose(g_whole, g_chunked)
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(whole, reference, atol=1e-6)


def test_half_precision_logits_give_float32_logprobs():
    logits = torch.log(torch.tensor([[[1.0, 3.0]]])).to(torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([[1]]))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log(0.75), abs=1e-2)


def test_zero_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_fused_head_matches_logits_then_logprobs_in_values_and_gradients():
    from graft.algo import linear_token_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 40, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g)  # advantage-like weights per token
    fused = linear_token_logprobs(hidden, weight, ids, temperature=0.7, chunk_rows=4, vocab_block=16)  # 4 x 3
    fused_grads = torch.autograd.grad((fused * upstream).sum(), [hidden, weight])
    plain = token_logprobs(hidden @ weight.T, ids, temperature=0.7)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), [hidden, weight])
    assert torch.allclose(fused, plain, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_head_by_hand():
    from graft.algo import linear_token_logprobs

    # hidden [1, 0] picks the first column of the weight: logits ln(1), ln(2), ln(5) again
    weight = torch.log(torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]]).clamp(min=1e-30))
    weight[:, 1] = 0.0
    out = linear_token_logprobs(torch.tensor([[[1.0, 0.0]]]), weight, torch.tensor([[2]]))
    assert out.item() == pytest.approx(math.log(5 / 8), abs=1e-6)


def test_fused_head_backward_matches_autograd_under_bf16_autocast():
    # The custom backward recomputes the logits; under autocast it must do so in bf16 as the forward did,
    # or exp(logits - lse) mixes float32 logits with a bf16 log-sum-exp and the gradient drifts.
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(24, 32, generator=gen) * 3).requires_grad_()
    weight = torch.randn(500, 32, generator=gen)
    tokens = torch.randint(0, 500, (1, 24), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_token_logprobs(hidden[None], weight, tokens, temperature=0.7, chunk_rows=10)
    (grad_fused,) = torch.autograd.grad(fused.sum(), hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = token_logprobs((hidden @ weight.T)[None], tokens, temperature=0.7)
    (grad_plain,) = torch.autograd.grad(plain.sum(), hidden)
    assert torch.allclose(fused, plain, atol=1e-3)
    assert (grad_fused - grad_plain).abs().max() < 0.05 * grad_plain.abs().max()


def test_fused_head_gradient_by_hand():
    # weight rows [1] and [0]: logits [x, 0], so log p(token 0) = x - log(e^x + 1), d/dx = 1 - sigmoid(x).
    # With vocab_block=1 the online softmax sweeps the two tokens in separate blocks.
    x = torch.tensor([[[0.0], [math.log(3.0)]]], requires_grad=True)  # sigmoid = 1/2, 3/4
    weight = torch.tensor([[1.0], [0.0]])
    out = linear_token_logprobs(x, weight, torch.tensor([[0, 0]]), vocab_block=1)
    assert out[0].tolist() == pytest.approx([math.log(0.5), math.log(0.75)], abs=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.flatten().tolist() == pytest.approx([0.5, 0.25], abs=1e-6)


@pytest.mark.parametrize("vocab_block", [7, 16, 40, 4096])
def test_fused_head_vocab_blocks_match_plain_with_frozen_head(vocab_block):
    # the LoRA case: the head is frozen, the hidden-state gradient comes from softmax @ weight kept by the
    # forward. Blocks that do not divide the vocabulary and tokens in every block must not matter.
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    upstream = torch.randn(2, 9, generator=g)
    fused = linear_token_logprobs(hidden, weight, ids, temperature=0.8, chunk_rows=5, vocab_block=vocab_block)
    (grad_fused,) = torch.autograd.grad((fused * upstream).sum(), hidden)
    plain = token_logprobs(hidden @ weight.T, ids, temperature=0.8)
    (grad_plain,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(grad_fused, grad_plain, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: the same values without the softmax @ weight matmul
        assert torch.allclose(
            linear_token_logprobs(hidden, weight, ids, 0.8, 5, vocab_block), plain, atol=1e-5
        )
