import math

import pytest
import torch

from graft.algo import adapt_entropy_coef, entropy_bonus_surrogate, policy_loss


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum()


def test_the_surrogate_over_every_token_weighted_by_its_probability_is_the_entropy_gradient():
    # the estimator is exact in expectation: sum_y p(y) * d/dz[-(s(y) - H) log p(y)] = -dH/dz
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0], requires_grad=True)
    logp = torch.log_softmax(logits, dim=-1)
    p, H = logp.exp().detach(), _entropy(logits.detach())
    expected = sum(
        p[y] * entropy_bonus_surrogate(logp[y] - logp[y].detach(), -logp[y].detach(), H) for y in range(4)
    )
    (estimated,) = torch.autograd.grad(expected, logits)
    (true,) = torch.autograd.grad(_entropy(logits), logits)
    torch.testing.assert_close(estimated, -true, rtol=1e-5, atol=1e-6)


def test_the_surrogate_by_hand():
    # p = (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623; the rare token sampled: s = ln 4 = 1.3863
    H = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    log_ratio = torch.zeros(1, 1, requires_grad=True)  # mu = 1: ratio 1
    loss = entropy_bonus_surrogate(log_ratio, torch.tensor([[math.log(4)]]), torch.tensor([[H]]))
    (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
    assert loss.item() == pytest.approx(-(math.log(4) - H), abs=1e-6)  # -0.8240
    assert grad.item() == pytest.approx(-(math.log(4) - H), abs=1e-6)  # push the rare token up
    # the likely token sampled: s = ln(4/3) = 0.2877 < H, so it is pushed down
    loss = entropy_bonus_surrogate(log_ratio, torch.tensor([[math.log(4 / 3)]]), torch.tensor([[H]]))
    assert loss.item() == pytest.approx(H - math.log(4 / 3), abs=1e-6)  # +0.2747


@pytest.mark.parametrize(
    "coef, entropy, expected",
    [
        (0.0, 0.1, 0.005),  # below the target: up by a step
        (0.098, 0.1, 0.1),  # never past the maximum
        (0.02, 0.5, 0.015),  # above: down by a step
        (0.003, 0.5, 0.0),  # never below 0
        (0.0, 0.3, 0.0),  # at the target counts as above
    ],
)
def test_adapting_the_coefficient_by_hand(coef, entropy, expected):
    assert adapt_entropy_coef(coef, entropy, target=0.3, step=0.005, max_coef=0.1) == pytest.approx(expected)


def _loss_gradient(entropy_coef: float, baseline):
    logprobs = torch.tensor([[-0.1, -2.0], [-0.7, -0.3]], requires_grad=True)
    out = policy_loss(
        logprobs,
        logprobs.detach(),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 2),
        loss_type="dapo",
        num_sequences=2,
        num_tokens=4,
        max_completion_length=2,
        entropy_coef=entropy_coef,
        entropy_baseline=baseline,
    )
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    return grad


def test_the_bonus_adds_its_weighted_surprisal_advantage_to_each_token():
    # dapo: per-token loss / 4 tokens; the policy term's gradient is -A / 4, the bonus's -c (s - H) / 4
    H = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    plain = _loss_gradient(0.0, H)
    bonus = _loss_gradient(0.2, H)
    surprisal = torch.tensor([[0.1, 2.0], [0.7, 0.3]])
    torch.testing.assert_close(bonus - plain, -0.2 * (surprisal - H) / 4)
    torch.testing.assert_close(plain, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) / 4)


def test_without_the_samplers_entropy_the_baseline_is_the_mean_surprisal():
    plain = _loss_gradient(0.0, None)
    bonus = _loss_gradient(0.2, None)
    surprisal = torch.tensor([[0.1, 2.0], [0.7, 0.3]])
    torch.testing.assert_close(bonus - plain, -0.2 * (surprisal - surprisal.mean()) / 4)
