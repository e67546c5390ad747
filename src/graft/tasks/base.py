from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # gold answer, handed to rewards as the `answer` column
    columns: dict[str, Any] = field(default_factory=dict)  # extra dataset columns passed to rewards


@dataclass
class Task:
    name: str
    train: list[Problem]
    eval: list[Problem]
    system_prompt: str | None
    default_rewards: tuple[str, ...]

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat messages for a problem, the same in training, evaluation and inference."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": problem.prompt}]

    def reward_inputs(self, problems: list[Problem]) -> tuple[list[list[dict[str, str]]], dict[str, list]]:
        """(prompts as chat messages, dataset columns) for reward functions, one entry per completion:
        the gold `answer` and every extra column, as TRL passes them."""
        columns: dict[str, list] = {"answer": [p.answer for p in problems]}
        for key in problems[0].columns if problems else ():
            columns[key] = [p.columns.get(key) for p in problems]
        return [self.messages(p) for p in problems], columns
