"""Every built-in reward on hand-written completions: right, wrong, malformed, empty."""

import math

import pytest

from graft.rewards import builtin as b
from graft.rewards.runtime import RewardRuntime

MSG = [{"role": "assistant", "content": "so the total is #### 1,200"}]  # TRL's conversational form


def test_gsm8k_strict_and_flexible():
    completions = ["so the total is #### 1,200", "the total is 1200.", "#### 1100", "no number", "", MSG]
    gold = ["1200"] * 6
    assert b.gsm8k_strict(None, completions, gold) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert b.gsm8k_flexible(None, completions, gold) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert b.gsm8k_flexible(None, ["costs $1,200.00 in all"], ["1200"]) == [1.0]


def test_math_equivalence():
    completions = [
        "so it is \\boxed{\\frac{1}{2}}",
        "the answer is $0.5$",
        "\\boxed{3}",
        "\\boxed{\\frac{",
        "",
    ]
    assert b.math_equivalence(None, completions, ["\\frac{1}{2}"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_numeric_proximity_prefers_near_misses():
    got = b.numeric_proximity(None, ["100", "101", "150", "-100", "none", ""], ["100"] * 6)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(1 / 1.01)
    assert got[2] == pytest.approx(1 / 1.5)
    assert got[3] == pytest.approx(1 / 3)
    assert got[4:] == [0.0, 0.0]
    assert got[0] > got[1] > got[2] > got[3]


GOOD = "<reasoning>\n2 + 2 is 4\n</reasoning>\n<answer>\n4\n</answer>\n"
THINK = "<think>\n2 + 2 is 4\n</think>\n<answer>\n4\n</answer>"
SLOPPY = "<reasoning>2 + 2 is 4</reasoning> <answer>4</answer> and more"
HALF = "<reasoning>\n2 + 2 is 4\n</reasoning>\n4"


def test_format_rewards():
    completions = [GOOD, THINK, SLOPPY, HALF, "4", ""]
    assert b.format_strict(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert b.format_soft(None, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    tags = b.format_tags(None, completions)
    assert tags[0] == 1.0 and tags[1] == 1.0
    assert tags[2] == pytest.approx(1.0 - 0.001 * len("and more"))
    assert tags[3] == 0.5 and tags[4] == 0.0 and tags[5] == 0.0


def test_soft_overlong_by_hand():
    # limit 100, cache 25: free up to 75 tokens, then linear to -1 at 100
    ids = [[0] * n for n in (10, 75, 90, 100, 0)]
    assert b.soft_overlong(None, [""] * 5, completion_ids=ids, max_completion_length=[100] * 5) == [
        0.0, 0.0, pytest.approx(-0.6), -1.0, 0.0,
    ]  # fmt: skip


def test_cosine_length_by_hand():
    ids = [[0] * n for n in (0, 50, 100, 0, 100)]
    got = b.cosine_length(
        None, ["7", "7", "7", "8", "8"], ["7"] * 5, completion_ids=ids, max_completion_length=[100] * 5
    )
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(0.75) and got[2] == pytest.approx(0.5)
    assert got[3] == pytest.approx(-1.0) and got[4] == pytest.approx(-0.5)


def test_repetition_penalty():
    loop = "the cat sat " * 10
    got = b.repetition_penalty(None, ["a b c d e f", loop, "one two", ""])
    assert got[0] == 0.0 and got[2] == 0.0 and got[3] == 0.0
    assert got[1] == pytest.approx(-(1 - 3 / 28))  # 28 trigrams, 3 distinct


def test_every_builtin_is_tested_here():
    tested = {
        "gsm8k_strict",
        "gsm8k_flexible",
        "math_equivalence",
        "numeric_proximity",
        "format_strict",
        "format_soft",
        "format_tags",
        "soft_overlong",
        "cosine_length",
        "repetition_penalty",
        "last_integer",
        "countdown",
        *WORDLE,
    }  # fmt: skip  (countdown: tests/tasks/test_countdown.py; wordle's rules: tests/tasks/test_wordle_rewards.py)
    assert set(b.BUILTIN_REWARDS) == tested


WORDLE = ("wordle_solved", "wordle_format", "wordle_feedback", "wordle_guess_value", "wordle_win")


def test_wordle_builtins_score_an_episode_given_as_messages():
    # secret "crane": slate (a and e in place, s l t absent), then crane (solved on guess 2).
    # solved 1; format: both real words in the tag -> 1; feedback: crane fits slate's feedback -> 1;
    # win: (7 - 2) / 6; the environment's turn between them is not the model's and is not scored
    episode = [
        {"role": "assistant", "content": "<guess>slate</guess>"},
        {"role": "user", "content": "S ❌ L ❌ A ✔ T ❌ E ✔"},
        {"role": "assistant", "content": "<guess>crane</guess>"},
    ]
    got = {name: b.BUILTIN_REWARDS[name](None, [episode], secret=["crane"])[0] for name in WORDLE}
    assert got["wordle_solved"] == 1.0 and got["wordle_format"] == 1.0 and got["wordle_feedback"] == 1.0
    assert got["wordle_win"] == pytest.approx(5 / 6)
    assert 0.0 < got["wordle_guess_value"] <= 1.0
    # an episode whose environment broke at once has no reply: nothing solved, nothing well-formed
    empty = {name: b.BUILTIN_REWARDS[name](None, [[]], secret=["crane"])[0] for name in WORDLE}
    assert empty == {name: 0.0 for name in WORDLE}


def test_math_equivalence_runs_in_a_worker_with_the_others_in_process():
    assert not b.runs_in_process("math_equivalence") and b.runs_in_process("format_tags")
    rt = RewardRuntime(["math_equivalence", "format_tags"])
    try:
        scores = rt.score([None, None], ["\\boxed{2}", "x"], {"answer": ["2", "2"]})
    finally:
        rt.close()
    assert scores["math_equivalence"] == [1.0, 0.0]
    assert [math.isfinite(v) for v in scores["format_tags"]] == [True, True]
