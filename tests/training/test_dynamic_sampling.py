"""Dynamic sampling (grpo.dynamic_sampling, DAPO): groups whose rewards all agree are left out of the loss,
and more prompts are drawn until the batch has enough groups that differ."""

import json

import pytest
import torch

from graft.batch import Rollout, ScoredBatch, concat_rollouts, select_groups
from graft.config import load_config
from graft.rewards import builtin
from graft.rollout.sampler import sample
from graft.training.grpo import minibatch_backward
from graft.training.loop import train


def rollout(prompt_width: int, completion_width: int, groups: int, G: int = 2, fill: int = 1) -> Rollout:
    B = groups * G
    prompt_ids = torch.arange(B * prompt_width).view(B, prompt_width) + 100 * fill
    completion_ids = torch.arange(B * completion_width).view(B, completion_width) + 1000 * fill
    return Rollout(prompt_ids, torch.ones(B, prompt_width, dtype=torch.long), completion_ids,
                   torch.ones(B, completion_width, dtype=torch.long), torch.full((B, completion_width), -0.5),
                   torch.zeros(B, dtype=torch.bool), G, torch.full((B, completion_width), 0.25))  # fmt: skip


def test_select_groups_keeps_whole_groups_in_the_order_asked():
    r = rollout(3, 4, groups=3)
    picked = select_groups(r, [2, 0])
    assert torch.equal(picked.prompt_ids, r.prompt_ids[[4, 5, 0, 1]])
    assert torch.equal(picked.completion_ids, r.completion_ids[[4, 5, 0, 1]])
    assert picked.group_size == 2 and picked.entropy.shape == (4, 4)


def test_concat_pads_prompts_left_and_completions_right_with_zero_masks():
    a, b = rollout(2, 5, groups=1), rollout(4, 3, groups=1, fill=2)
    joined = concat_rollouts([a, b], pad_id=0)
    assert joined.prompt_ids.shape == (4, 4) and joined.completion_ids.shape == (4, 5)
    # a's prompts gain two pad columns on the left, masked out; b's completions gain two on the right
    assert torch.equal(joined.prompt_mask[:2], torch.tensor([[0, 0, 1, 1]] * 2))
    assert torch.equal(joined.prompt_ids[:2, 2:], a.prompt_ids) and (joined.prompt_ids[:2, :2] == 0).all()
    assert torch.equal(joined.completion_mask[2:], torch.tensor([[1, 1, 1, 0, 0]] * 2))
    assert (joined.logprobs[2:, 3:] == 0).all() and (joined.entropy[2:, 3:] == 0).all()
    assert torch.equal(joined.completion_ids[2:, :3], b.completion_ids)


def first_char_digit(prompts, completions, **_):
    """Agrees within most groups of a random model's samples, differs in some: the case dynamic sampling is for."""
    return [1.0 if text[:1].isdigit() else 0.0 for text in completions]


@pytest.mark.parametrize("rounds", [1, 3])
def test_a_run_with_dynamic_sampling_trains_on_groups_with_signal_only(
    tiny_model_dir, tmp_path, monkeypatch, rounds
):
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "first_char_digit", first_char_digit)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "rewards.functions=[first_char_digit]",
                             "task.num_train=60", "task.num_eval=4", "grpo.num_generations=4",
                             "generation.max_new_tokens=6", "train.max_steps=3", "train.prompts_per_step=2",
                             "train.micro_batch_size=8", "train.learning_rate=0.01", "gate.enabled=false",
                             "eval.at_start=false", "eval.at_end=false", "grpo.dynamic_sampling=true",
                             f"grpo.max_sampling_rounds={rounds}", f"logging.output_dir={tmp_path}",
                             "logging.run_name=dyn", "logging.progress=lines", "logging.print_config=false"])  # fmt: skip
    run = train(cfg)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert len(steps) == 3
    for m in steps:
        assert 1 <= m["sampling/rounds"] <= rounds
        assert m["sampling/groups_drawn"] == 2 * m["sampling/rounds"]
        assert m["sampling/groups_kept"] + m["sampling/groups_dropped"] == m["sampling/groups_drawn"]
        assert m["sampling/groups_kept"] <= 2  # prompts_per_step, or the first rollout when none differ
        if m["sampling/rounds"] == 1:  # one rollout: the fast path still replays it
            assert m["replayed"]
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    for step in {row["step"] for row in logged}:
        rows = [row for row in logged if row["step"] == step]
        kept_multi = [m for m in steps if m["step"] == step][0]
        if (
            kept_multi["sampling/rounds"] > 1
            and kept_multi["sampling/groups_kept"] < kept_multi["sampling/groups_drawn"]
        ):
            # joined from several rollouts: only groups whose rewards differ were kept
            for group in {row["group"] for row in rows}:
                rewards = {row["reward"] for row in rows if row["group"] == group}
                assert len(rewards) > 1


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_a_group_left_out_of_the_loss_is_the_same_as_a_batch_without_it(tiny_model, loss_type):
    """The single-rollout case masks dropped groups (so the fast path can replay it) instead of removing
    them: the gradient must be the one of the batch that holds only the kept groups."""
    r = sample(tiny_model, [[1, 33, 31, 17], [1, 40, 8], [1, 5, 6]], group_size=3, max_new_tokens=6, pad_id=0,
               stop_ids=[2], generator=torch.Generator().manual_seed(1))  # fmt: skip
    cfg = load_config(
        None, [f"grpo.loss_type={loss_type}", "train.micro_batch_size=4", "grpo.num_generations=3"]
    )
    advantages = torch.tensor([0.5, -1.0, 0.5, 0.0, 0.0, 0.0, 1.0, -0.5, -0.5])

    def grad(batch):
        tiny_model.zero_grad(set_to_none=True)
        minibatch_backward(tiny_model, batch, torch.arange(len(batch.rewards)), cfg, torch.device("cpu"))
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    masked = ScoredBatch(
        r, torch.zeros(9), advantages, None, None, loss_rows=torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1]).bool()
    )
    kept = select_groups(r, [0, 2])
    dropped = ScoredBatch(kept, torch.zeros(6), advantages[[0, 1, 2, 6, 7, 8]], None, None)
    assert torch.allclose(grad(masked), grad(dropped), atol=1e-6)
