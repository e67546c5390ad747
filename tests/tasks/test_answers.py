"""Answer extraction (what maj@k votes on) and the worked solutions tasks write for SFT."""

import pytest

from graft.config import TaskConfig
from graft.rewards.builtin import BUILTIN_REWARDS, format_strict
from graft.tasks import Problem, build_task
from graft.tasks.answers import extract_answer
from graft.tasks.base import Task


def task(correctness: str, prompt_format: str = "plain") -> Task:
    return Task("t", [], [], None, (correctness,), prompt_format=prompt_format)


@pytest.mark.parametrize(
    ("correctness", "fmt", "text", "expected"),
    [
        ("last_integer", "plain", "7 + 5 = 12", "12"),
        ("last_integer", "plain", "about 3.5", None),
        ("gsm8k_flexible", "plain", "It costs $1,200.00 in total", "1200"),
        ("gsm8k_flexible", "plain", "half: 0.5", "0.5"),
        ("math_equivalence", "plain", "so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("math_equivalence", "plain", "no box here", None),
        ("last_integer", "reasoning", "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>", "7"),
        ("last_integer", "reasoning", "3 + 4 = 7", None),  # the format asks for an <answer> block
        ("countdown", "plain", "Let me see.\n(1 + 2) *  3", "(1 + 2) * 3"),
    ],
)
def test_extract_answer(correctness, fmt, text, expected):
    assert extract_answer(task(correctness, fmt), text) == expected


@pytest.mark.parametrize("prompt_format", ["plain", "reasoning", "think"])
@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_task_demonstrations_are_right_and_in_format(name, prompt_format):
    t = build_task(TaskConfig(name=name, num_train=30, num_eval=5, prompt_format=prompt_format))
    demos = [t.demonstration(p) for p in t.train]
    prompts, columns = t.reward_inputs(t.train)
    correctness = BUILTIN_REWARDS[t.default_rewards[0]]
    assert correctness(prompts, demos, **columns) == [1.0] * len(demos)
    if prompt_format != "plain":
        assert format_strict(prompts, demos) == [1.0] * len(demos)
    assert extract_answer(t, demos[0]) is not None


def test_a_task_without_solutions_says_to_give_sft_data():
    from graft.config import ConfigError

    with pytest.raises(ConfigError, match="sft.data a JSONL"):
        task("gsm8k_flexible").demonstration(Problem("q", "1"))
