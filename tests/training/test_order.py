"""Which problems a step gets: the seeded order, and prompt selection by difficulty (train.skip_solved)."""

import json
from collections import Counter

import pytest
import torch

from graft.config import load_config
from graft.rewards import builtin
from graft.tasks import Problem, Task
from graft.training.loop import TrainingInterrupted, train
from graft.training.order import PromptOrder, next_streak, solved_groups


def make_task(n: int) -> Task:
    problems = [Problem(prompt=f"p{i}", answer=str(i)) for i in range(n)]
    return Task("t", problems, [], None, ("last_integer",))


def test_solved_groups_needs_every_completion_fully_right():
    # G = 3: all right; one partial score (0.5 is not full marks); all wrong; a NaN (failed reward)
    correct = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, float("nan"), 1.0])
    assert solved_groups(correct, 3).tolist() == [True, False, False, False]


def test_streak_counts_solved_groups_in_a_row():
    assert next_streak(0, True) == 1
    assert next_streak(2, True) == 3
    assert next_streak(3, False) == 0


def test_without_selection_every_problem_comes_once_per_epoch():
    order = PromptOrder(make_task(6), seed=3)
    first, second = order.take(6), order.take(6)
    assert sorted(first) == sorted(second) == list(range(6)) and order.epoch == 1
    assert first != second  # reshuffled
    order.record([(order.task.train[i], True) for i in range(6)])  # ignored when skip_solved is 0
    assert sorted(order.take(6)) == list(range(6))
    assert order.state() == {"epoch": 2, "position": 6} and order.metrics() == {}


def test_a_problem_solved_twice_in_a_row_rests_for_an_epoch_and_comes_back():
    task = make_task(6)
    order = PromptOrder(task, seed=0, skip_solved=2, revisit_after=1)

    def step(n: int, solved: set[int]) -> list[int]:  # draw n, then record which of them were solved
        drawn = order.take(n)
        order.record([(task.train[i], i in solved) for i in drawn])
        return sorted(drawn)

    step(6, {0, 1, 2})
    assert step(6, {0, 1}) == list(range(6))  # solved once: not yet; 2 failed, its streak starts over
    assert order.metrics() == {"sampling/skipped_solved": 0, "sampling/resting": 2}
    assert step(4, {2}) == [2, 3, 4, 5] and order.epoch == 2  # 0 and 1 sit this epoch out
    assert step(6, {0}) == list(range(6)) and order.epoch == 3  # back; 2 solved once in a row only
    assert order.metrics() == {"sampling/skipped_solved": 2, "sampling/resting": 1}
    # 0's streak was kept while it rested: solved on its return, it rests again at once; 1 failed
    assert step(5, set()) == [1, 2, 3, 4, 5] and order.epoch == 4


def test_a_problem_rests_from_the_epoch_after_the_one_it_was_drawn_in():
    task = make_task(4)
    order = PromptOrder(task, seed=2, skip_solved=1, revisit_after=1)
    first = order.take(4)
    order.take(1)  # the step wraps into epoch 1 before its record
    assert order.epoch == 1
    order.record([(task.train[first[-1]], True)])
    assert order.state()["resting"] == {str(first[-1]): 2}  # sits out epoch 1, back in epoch 2


def test_longer_rests_and_every_problem_resting():
    task = make_task(3)
    order = PromptOrder(task, seed=1, skip_solved=1, revisit_after=2)
    order.take(3)
    order.record([(p, True) for p in task.train])  # all solved: every problem rests two epochs
    drawn = order.take(3)  # passes over the resting epochs instead of hanging
    assert sorted(drawn) == [0, 1, 2] and order.epoch == 3
    assert order.metrics()["sampling/skipped_solved"] == 6


def test_the_state_restores_the_same_draws():
    task = make_task(7)
    order = PromptOrder(task, seed=5, skip_solved=1, revisit_after=1)
    for _ in range(3):
        drawn = order.take(3)
        order.record([(task.train[i], i % 2 == 0) for i in drawn])
    state = json.loads(json.dumps(order.state()))  # as a checkpoint keeps it
    again = PromptOrder(task, seed=5, skip_solved=1, revisit_after=1)
    again.restore(state)
    for _ in range(4):
        a, b = order.take(3), again.take(3)
        assert a == b
        order.record([(task.train[i], True) for i in a])
        again.record([(task.train[i], True) for i in b])


# --------------------------------------------------------------------------------------- in the loop


def digit_share(prompts, completions, **_):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def even_answers_solved(prompts, completions, answer, **_):
    """Correctness that marks every problem with an even answer solved, whatever was written."""
    return [float(int(a) % 2 == 0) for a in answer]


@pytest.fixture(autouse=True)
def _rewards(monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "digit_share", digit_share)
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "last_integer", even_answers_solved)


def order_config(model_dir, out_dir, name, *overrides):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "rewards.functions=[digit_share]",
            "task.num_train=8",  # 2 prompts a step: an epoch every 4 steps
            "task.num_eval=4",
            "grpo.num_generations=3",
            "generation.max_new_tokens=6",
            "train.max_steps=12",
            "train.prompts_per_step=2",
            "train.micro_batch_size=6",
            "train.learning_rate=0.01",
            "train.deterministic=true",
            "eval.every_n_steps=0",
            "eval.at_start=false",
            "checkpoint.every_n_steps=3",
            f"logging.output_dir={out_dir}",
            f"logging.run_name={name}",
            "logging.progress=lines",
            "logging.print_config=false",
            "gate.enabled=false",
            *overrides,
        ],
    )


def drawn_prompts(run_dir) -> Counter:
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    groups = {(r["step"], r["prompt"], r["answer"]) for r in rows}
    return Counter((prompt, answer) for _, prompt, answer in groups)


def test_training_rests_solved_problems_and_logs_it(tiny_model_dir, tmp_path):
    plain = drawn_prompts(train(order_config(tiny_model_dir, tmp_path, "plain")))
    assert set(plain.values()) == {3}  # 24 draws over 8 problems: three epochs
    run = train(order_config(tiny_model_dir, tmp_path, "skip", "train.skip_solved=1"))
    counts = drawn_prompts(run)
    even = [n for (_, answer), n in counts.items() if int(answer) % 2 == 0]
    odd = [n for (_, answer), n in counts.items() if int(answer) % 2]
    assert even and odd and len(counts) == 8
    assert max(even) < min(odd)  # the solved ones sat out every other epoch
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in rows if "loss" in m]  # the step rows (evaluations have their own)
    assert len(metrics) == 12
    assert sum(m["sampling/skipped_solved"] for m in metrics) > 0
    assert max(m["sampling/resting"] for m in metrics) == len(even)


def test_a_resumed_run_rests_the_same_problems(tiny_model_dir, tmp_path):
    straight = train(order_config(tiny_model_dir, tmp_path, "straight", "train.skip_solved=1"))
    with pytest.raises(TrainingInterrupted):
        train(order_config(tiny_model_dir, tmp_path, "resumed", "train.skip_solved=1"), stop_after=7)
    resumed = train(order_config(tiny_model_dir, tmp_path, "resumed", "train.skip_solved=1", "resume=auto"))
    assert step_prompts(resumed) == step_prompts(straight)


def step_prompts(run_dir) -> list[tuple[int, str]]:
    rows = map(json.loads, (run_dir / "completions.jsonl").read_text().splitlines())
    return [(r["step"], r["prompt"]) for r in rows]
