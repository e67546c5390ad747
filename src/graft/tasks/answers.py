"""The final answer a completion gives, as a short comparable string: what maj@k votes on and what format
compliance checks for. It mirrors how the task's correctness reward reads a completion."""

from __future__ import annotations

import re

from graft.tasks.base import Task
from graft.text import answer_block, extract_last_integer, extract_last_number, last_boxed


def _number_text(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(task: Task, text: str) -> str | None:
    """The completion's final answer as the task's correctness reward would read it; None = no answer given.

    Tagged formats (reasoning / think) must put it in an <answer> block; within that text the reading
    follows the correctness reward: the last integer, the last number, the last \\boxed{}, or the last line.
    """
    if task.prompt_format != "plain":
        inner = answer_block(text)
        if inner is None:
            return None
        text = inner
    correctness = task.default_rewards[0]
    if correctness == "last_integer":
        value = extract_last_integer(text)
        return None if value is None else str(value)
    if correctness in ("gsm8k_flexible", "gsm8k_strict", "numeric_proximity"):
        number = extract_last_number(text)
        return None if number is None else _number_text(number)
    if correctness == "math_equivalence":
        boxed = last_boxed(text)
        if boxed is None and task.prompt_format == "plain":
            return None
        return re.sub(r"\s+", "", boxed if boxed is not None else text) or None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[-1]) if lines else None
