from fractions import Fraction

import pytest

from graft.config import TaskConfig
from graft.rewards.builtin import BUILTIN_REWARDS
from graft.tasks import build_task
from graft.tasks.countdown import extract_expression, safe_value


def test_problems_are_seeded_split_and_carry_numbers_and_target():
    task = build_task(TaskConfig(name="countdown", num_train=50, num_eval=10, num_numbers=3))
    assert len(task.train) == 50 and len(task.eval) == 10
    p = task.train[0]
    assert len(p.columns["numbers"]) == 3 and str(p.columns["target"]) == p.answer
    assert (
        build_task(TaskConfig(name="countdown", num_train=50, num_eval=10, num_numbers=3)).train == task.train
    )


def test_every_generated_problem_has_a_solution():
    from itertools import permutations, product

    task = build_task(TaskConfig(name="countdown", num_train=20, num_eval=5, num_numbers=3, max_operand=9))
    for p in task.train:
        a, b, c = p.columns["numbers"]
        exprs = (
            f"({x} {o1} {y}) {o2} {z}"
            for x, y, z in permutations((a, b, c))
            for o1, o2 in product("+-*/", repeat=2)
        )
        assert any((v := safe_value(e)) and v[0] == p.columns["target"] for e in exprs), p.prompt


def test_safe_evaluator_allows_arithmetic_only():
    assert safe_value("(1 + 2) * 3 - 4 / 2") == (Fraction(7), [1, 2, 3, 4, 2])
    for bad in ("__import__('os')", "2 ** 10", "x + 1", "1 / 0", "abs(-3)", "(1 +", "[1]"):
        assert safe_value(bad) is None, bad


def test_countdown_reward():
    reward = BUILTIN_REWARDS["countdown"]
    completions = [
        "I think (3 + 5) * 2 works.\n(3 + 5) * 2",  # right, last line
        "<answer>2 * (5 + 3)</answer>",  # right, answer tag
        "(3 + 5) * 2 = 16",  # right, with the result written after '='
        "3 * 5 + 2",  # uses each number, wrong value
        "(3 + 5) * 2 * 1",  # uses a number not given
        "16",  # no expression
        "",
    ]
    n = len(completions)
    got = reward(None, completions, numbers=[[2, 3, 5]] * n, target=[16] * n)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert extract_expression("<answer> 1+2 </answer>") == "1+2"


@pytest.mark.parametrize("fmt, tag", [("reasoning", "<reasoning>"), ("think", "<think>")])
def test_prompt_formats_extend_the_system_prompt(fmt, tag):
    task = build_task(TaskConfig(name="countdown", num_train=5, num_eval=2, prompt_format=fmt))
    assert tag in task.system_prompt and "<answer>" in task.system_prompt
    assert task.default_rewards == ("countdown", "format_tags")
