import math

import pytest
import torch

from graft.algo import aggregate_loss, clipped_surrogate, importance_log_ratio, k3_kl, policy_loss

# ------------------------------------------------------------------------------------------ k3 KL


def test_k3_value_and_gradient_by_hand():
    # pi = 0.5, ref = 0.25: d = ln(ref/pi) = -ln 2; k3 = e^d - d - 1 = 0.5 + ln 2 - 1
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    kl = k3_kl(logp, ref)
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)  # 0.19315
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert grad.item() == pytest.approx(1 - 0.5, abs=1e-6)  # d/dlogp = 1 - e^d


def test_k3_is_zero_with_zero_gradient_at_the_reference():
    logp = torch.tensor([[-1.3, -0.2]], requires_grad=True)
    kl = k3_kl(logp, logp.detach().clone())
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert kl.abs().max().item() == 0.0
    assert grad.abs().max().item() == 0.0


def test_k3_is_non_negative():
    g = torch.Generator().manual_seed(0)
    kl = k3_kl(torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g))
    assert (kl >= 0).all()


# ------------------------------------------------------------------------------------------ clipping


def _surrogate(ratio: float, adv: float, **kw):
    log_ratio = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, clipped = clipped_surrogate(log_ratio, torch.tensor([adv]), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
    return loss.item(), grad.item(), clipped.item()


@pytest.mark.parametrize(
    "ratio, adv, loss, grad, clipped",
    [
        (1.5, 1.0, -1.2, 0.0, True),  # good token already pushed up past 1 + eps: no more push
        (0.5, 1.0, -0.5, -0.5, False),  # good token pushed down: gradient -r*A restores it
        (1.5, -1.0, 1.5, 1.5, False),  # bad token pushed up: pessimistic side keeps the full ratio
        (0.5, -1.0, 0.8, 0.0, True),  # bad token already pushed down past 1 - eps: stop
    ],
)
def test_clipping_in_all_four_sign_and_ratio_cases(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, got_clipped = _surrogate(ratio, adv, epsilon=0.2)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)
    assert got_clipped is clipped


def test_clip_higher_widens_only_the_upper_side():
    assert _surrogate(1.25, 1.0, epsilon=0.2)[0] == pytest.approx(-1.2)
    loss, grad, clipped = _surrogate(1.25, 1.0, epsilon=0.2, epsilon_high=0.28)
    assert (loss, clipped) == (pytest.approx(-1.25), False)
    assert grad == pytest.approx(-1.25)
    assert _surrogate(0.7, -1.0, epsilon=0.2, epsilon_high=0.28)[0] == pytest.approx(0.8)


def test_delta_caps_the_unclipped_ratio():
    # negative advantage, ratio 2: without delta the loss is 2; delta = 1.4 caps it (and its gradient)
    assert _surrogate(2.0, -1.0, epsilon=0.2)[0] == pytest.approx(2.0)
    loss, grad, _ = _surrogate(2.0, -1.0, epsilon=0.2, delta=1.4)
    assert loss == pytest.approx(1.4)
    assert grad == 0.0


# ------------------------------------------------------------------------------------------ ratio level


def test_sequence_level_ratio_is_the_masked_mean_log_ratio():
    logp = torch.tensor([[0.2, 0.4, 9.0], [0.3, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    seq = importance_log_ratio(logp, old, mask, "sequence")
    assert seq.shape == (2, 1)
    assert torch.allclose(seq, torch.tensor([[0.3], [0.3]]))
    (grad,) = torch.autograd.grad(seq.sum(), logp)
    assert torch.allclose(grad, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    token = importance_log_ratio(logp, old, mask, "token")
    assert torch.equal(token, logp - old)


# ------------------------------------------------------------------------------------------ aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])  # the 7s are padding
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (2.0 + 4.0) / 2),  # mean of per-sequence means
        ("bnpo", 10.0 / 4),  # token mean of the micro-batch
        ("dr_grpo", 10.0 / (2 * 4)),  # token sum / (sequences x max_completion_length = 4)
        ("dapo", 10.0 / 4),  # token sum / tokens in the optimizer step
    ],
)
def test_every_aggregation_by_hand(loss_type, expected):
    got = aggregate_loss(LOSS, MASK, loss_type, num_sequences=2, num_tokens=4, max_completion_length=4)
    assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_whole_batch(loss_type):
    whole = aggregate_loss(LOSS, MASK, loss_type, 2, 4, 4)
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], loss_type, 2, 4, 4) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())


def test_bnpo_averages_micro_batch_token_means():
    # micro-batch means 2 and 4, averaged: 3 (not the global token mean 2.5: that is dapo)
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "bnpo", 2, 4, 4) for i in range(2))
    assert parts.item() == pytest.approx(3.0)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(LOSS, MASK, "mean", 2, 4, 4)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ whole loss


def test_policy_loss_gradient_at_ratio_one_is_minus_advantage_over_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    out = policy_loss(
        logp,
        logp.detach(),
        adv,
        MASK,
        loss_type="dapo",
        num_sequences=2,
        num_tokens=4,
        max_completion_length=4,
    )
    # at ratio 1 the loss is -sum(A * mask) / 4 = -(2 * 3 - 1) / 4
    assert out.loss.item() == pytest.approx(-1.25)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.allclose(grad, torch.tensor([[-0.5, -0.5, -0.5], [0.25, 0.0, 0.0]]))
    assert out.clip_fraction.item() == 0.0
    assert out.kl is None


def test_policy_loss_adds_beta_times_kl():
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    mask = torch.ones(1, 2)
    kw = dict(loss_type="dapo", num_sequences=1, num_tokens=2, max_completion_length=2)
    without = policy_loss(logp, logp, torch.tensor([1.0]), mask, **kw)
    with_kl = policy_loss(logp, logp, torch.tensor([1.0]), mask, beta=0.1, ref_logprobs=ref, **kw)
    k3 = 0.5 + math.log(2) - 1
    assert with_kl.kl.item() == pytest.approx(k3, abs=1e-6)
    assert with_kl.loss.item() == pytest.approx(without.loss.item() + 0.1 * k3, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp, torch.tensor([1.0]), mask, beta=0.1, **kw)


def test_sequence_level_loss_clips_whole_sequences():
    # token log-ratios 0.5 and 0 average to 0.25: ratio e^.25 = 1.284 > 1.2, so the whole sequence clips
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    out = policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), loss_type="dapo",
        num_sequences=1, num_tokens=2, max_completion_length=2, importance_sampling_level="sequence",
    )  # fmt: skip
    assert out.clip_fraction.item() == 1.0
    assert out.loss.item() == pytest.approx(-1.2)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad.abs().max().item() == 0.0
