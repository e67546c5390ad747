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
        want = {"+": "addition", "*": "multiplication"}.get(op) or (
            "subtraction below 0" if int(a) < int(b) else "subtraction"
        )
        assert p.kind == want, p


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


def test_templates_ask_every_training_problem_in_each_phrasing_and_hold_out_unseen_ones():
    cfg = TaskConfig(
        max_operand=9,
        num_eval=10,
        templates=[
            "What is {a} {op} {b}?",
            "{a} {op_word} {b} = ?",
            {"+": "Ann has {a} pens and gets {b} more."},
        ],
        unseen_templates=[
            {"-": "It is {a} degrees and drops {b} degrees. How warm is it?"},
            "Sum up {a} {op} {b}.",
        ],
    )
    task = build_task(cfg)
    # 0..9 with + and -: 200 problems, 10 held out; each training one in both plain phrasings, an addition
    # also as a story
    plain = [p for p in task.train if p.prompt.startswith("What is ")]
    additions = sum(" + " in p.prompt for p in plain)
    assert len(plain) == 190 and len(task.train) == 2 * 190 + additions
    assert {p.prompt for p in task.train if p.prompt.startswith("Ann")} == {
        f"Ann has {a} pens and gets {b} more."
        for a, op, b in (p.prompt[8:-1].split() for p in plain)
        if op == "+"
    }
    assert all(p.prompt.startswith("What is ") for p in task.eval)  # held out in the first phrasing
    assert all(p.prompt.startswith("What is ") for p in task.train[:4])  # the gate probes 4 problems, not 1
    assert len(task.unseen) == 10
    for held, unseen in zip(task.eval, task.unseen, strict=True):
        assert held.answer == unseen.answer  # the same problem, asked another way
        a, op, b = held.prompt[8:-1].split()
        assert unseen.prompt in (
            f"Sum up {a} {op} {b}.",
            f"It is {a} degrees and drops {b} degrees. How warm is it?",
        )
        assert op == "-" or "degrees" not in unseen.prompt  # a wording only for the operation it words
    assert any("degrees" in p.prompt for p in task.unseen) and any("Sum" in p.prompt for p in task.unseen)
    assert task.demonstration(task.train[1]) == task.train[1].answer  # the plain format: the answer itself


def test_one_phrasing_keeps_the_problems_it_always_had():
    assert build_task(TaskConfig()).train == build_task(TaskConfig(templates=["What is {a} {op} {b}?"])).train
    assert build_task(TaskConfig()).unseen == []


@pytest.mark.parametrize(
    ("templates", "unseen", "message"),
    [
        (["What is {x}?"], [], "uses \\['x'\\]"),
        (["What is {a} {op}?"], [], "both {a} and {b}"),
        (["What is {a"], [], "not a valid phrasing"),
        ([{"+": "{a} and {b}"}], [], "needs every operation"),
        (["What is {a} {op} {b}?"], ["What is {a} {op} {b}?"], "must not be trained on"),
        ([], [], "templates is empty"),
    ],
)
def test_bad_phrasings_are_refused_with_the_reason(templates, unseen, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(templates=templates, unseen_templates=unseen)
