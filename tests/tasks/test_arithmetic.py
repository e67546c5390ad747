import operator

import pytest

from graft.config import TaskConfig
from graft.tasks import build_task

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_answers_are_right_and_split_never_overlaps():
    task = build_task(TaskConfig(num_train=300, num_eval=50, operations=["+", "-", "*"], max_operand=30))
    assert len(task.eval) == 50 and len(task.train) == 300
    assert not {p.prompt for p in task.train} & {p.prompt for p in task.eval}
    for p in task.train + task.eval:
        a, op, b = p.prompt.removeprefix("What is ").removesuffix("?").split()
        assert int(p.answer) == OPS[op](int(a), int(b))


def test_seeded_and_seed_sensitive():
    a = build_task(TaskConfig(seed=1))
    b = build_task(TaskConfig(seed=1))
    c = build_task(TaskConfig(seed=2))
    assert a.train == b.train and a.eval == b.eval
    assert a.eval != c.eval


def test_small_space_gives_training_every_problem_not_held_out():
    # 0..4 with + and -: 5 * 5 * 2 = 50 distinct problems, 10 held out
    task = build_task(TaskConfig(max_operand=4, num_train=1000, num_eval=10))
    assert len(task.eval) == 10 and len(task.train) == 40
    assert len({p.prompt for p in task.train}) == 40


def test_difficulty_settings_are_respected():
    task = build_task(
        TaskConfig(min_operand=100, max_operand=999, operations=["*"], num_train=50, num_eval=5)
    )
    for p in task.train:
        a, op, b = p.prompt.removeprefix("What is ").removesuffix("?").split()
        assert op == "*" and 100 <= int(a) <= 999 and 100 <= int(b) <= 999


def test_too_few_problems_for_the_eval_split_is_refused():
    with pytest.raises(ValueError, match="widen the operand range"):
        build_task(TaskConfig(max_operand=1, operations=["+"], num_eval=4))


def test_messages_use_the_system_prompt():
    task = build_task(TaskConfig(system_prompt="Be brief."))
    assert task.messages(task.eval[0]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": task.eval[0].prompt},
    ]
    assert build_task(TaskConfig(system_prompt=None)).messages(task.eval[0])[0]["role"] == "user"
