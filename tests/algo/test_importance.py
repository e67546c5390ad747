import math

import pytest
import torch
from pydantic import ValidationError

from graft.algo import mismatch_metrics, sampler_log_ratio, truncated_importance_weights
from graft.config import GrpoConfig

LN2 = math.log(2)

# Two completions: four real tokens, two padding positions (one holding -inf, as a careless engine might).
# pi_trainer / pi_sampler per real token: 0.5/0.25 = 2, 0.2/0.4 = 0.5, 0.9/0.9 = 1, 0.3/0.6 = 0.5
TRAINER = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)], [math.log(0.3), 0.0, 0.0]])
SAMPLER = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.9)], [math.log(0.6), -math.inf, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_log_ratio_is_trainer_minus_sampler_and_zero_on_padding():
    expected = torch.tensor([[LN2, -LN2, 0.0], [-LN2, 0.0, 0.0]])
    assert torch.allclose(sampler_log_ratio(TRAINER, SAMPLER, MASK), expected, atol=1e-6)


def test_truncated_weights_cut_only_large_ratios():
    weights = truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=1.5)
    # ratio 2 -> cap 1.5; ratios 0.5 and 1 stay; padding 0 (not nan, despite the -inf there)
    expected = torch.tensor([[1.5, 0.5, 1.0], [0.5, 0.0, 0.0]])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(
        truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=2.0)[0, 0], torch.tensor(2.0)
    )


def test_weights_are_constants_in_the_loss():
    trainer = TRAINER.clone().requires_grad_(True)
    weights = truncated_importance_weights(trainer, SAMPLER, MASK, cap=2.0)
    assert not weights.requires_grad  # a weight must not push the trainer toward the sampler


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match=">= 1"):
        truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=0.5)


def test_mismatch_metrics_by_hand():
    m = mismatch_metrics(TRAINER, SAMPLER, MASK, cap=1.5)
    # |log r|: ln2, ln2, 0, ln2 over 4 tokens
    assert m.abs_logp_diff.item() == pytest.approx(3 * LN2 / 4, abs=1e-6)
    # k3 = r - ln r - 1: r=2 -> 1 - ln2; r=0.5 -> ln2 - 0.5 (twice); r=1 -> 0. Sum = ln2, mean ln2 / 4
    assert m.kl.item() == pytest.approx(LN2 / 4, abs=1e-6)
    assert m.max_ratio.item() == pytest.approx(2.0, abs=1e-6)
    assert m.min_ratio.item() == pytest.approx(0.5, abs=1e-6)
    assert m.capped_fraction.item() == pytest.approx(0.25)  # only the ratio-2 token exceeds 1.5
    assert mismatch_metrics(TRAINER, SAMPLER, MASK).capped_fraction.item() == 0.0  # no cap: nothing capped
    assert set(m.as_dict()) == {
        "sampler_abs_logp_diff",
        "sampler_kl",
        "sampler_max_ratio",
        "sampler_min_ratio",
        "sampler_capped_fraction",
    }


def test_identical_log_probs_give_no_mismatch():
    m = mismatch_metrics(TRAINER, TRAINER, MASK, cap=2.0)
    assert m.abs_logp_diff.item() == 0.0 and m.kl.item() == 0.0
    assert m.max_ratio.item() == 1.0 and m.min_ratio.item() == 1.0 and m.capped_fraction.item() == 0.0


def test_no_completion_tokens_gives_neutral_metrics():
    m = mismatch_metrics(TRAINER, SAMPLER, torch.zeros_like(MASK), cap=2.0)
    assert m.as_dict() == {
        "sampler_abs_logp_diff": 0.0,
        "sampler_kl": 0.0,
        "sampler_max_ratio": 1.0,
        "sampler_min_ratio": 1.0,
        "sampler_capped_fraction": 0.0,
    }


def test_tis_cap_config():
    assert GrpoConfig().tis_cap == 2.0
    assert GrpoConfig(tis_cap=None).tis_cap is None
    with pytest.raises(ValidationError):
        GrpoConfig(tis_cap=0.9)
