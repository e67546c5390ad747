import math

import pytest
import torch

from graft.algo import token_logprobs


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
