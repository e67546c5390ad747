from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FORMAT_INSTRUCTIONS = {
    "plain": "",
    "reasoning": "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>",
    "think": "Respond in the following format:\n<think>\n...\n</think>\n<answer>\n...\n</answer>",
}


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # gold answer, handed to rewards as the `answer` column
    columns: dict[str, Any] = field(default_factory=dict)  # extra dataset columns passed to rewards
    kind: str | None = None  # a label evaluations break accuracy down by (arithmetic: operation and sign)


@dataclass
class Task:
    name: str
    train: list[Problem]
    eval: list[Problem]
    system_prompt: str | None
    default_rewards: tuple[str, ...]  # the first is the correctness reward (accuracy)
    prompt_format: str = "plain"  # plain | reasoning | think: where the final answer is expected
    strict_reward: str | None = None  # a stricter correctness reward (GSM8K's '#### n'), for eval
    # (worked steps, final answer, the whole reply in the plain format): SFT demonstrations from the task
    solve: Callable[[Problem], tuple[str, str, str]] | None = None
    # multi-turn tasks: whole solved episodes as (conversation so far, the next reply) SFT examples
    episode_demonstrations: Callable[[], list[tuple[list[dict[str, str]], str]]] | None = None
    # held-out problems asked in phrasings never trained on (arithmetic's task.unseen_templates)
    unseen: list[Problem] = field(default_factory=list)

    def demonstration(self, problem: Problem) -> str:
        """A completion in the wanted format that solves `problem`: SFT warm-up data from the task itself."""
        if self.solve is None:
            from graft.config import ConfigError

            raise ConfigError(
                f"task {self.name} cannot write worked solutions; give sft.data a JSONL file of "
                '{"prompt": ..., "completion": ...} lines'
            )
        work, answer, plain = self.solve(problem)
        if self.prompt_format == "plain":
            return plain
        tag = "think" if self.prompt_format == "think" else "reasoning"
        return f"<{tag}>\n{work}\n</{tag}>\n<answer>\n{answer}\n</answer>"

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


def make_task(
    cfg,
    name: str,
    train: list[Problem],
    eval_: list[Problem],
    default_system: str | None,
    correctness: str,
    strict: str | None = None,
    solve=None,
) -> Task:
    """A task with the configured system prompt and answer format; format rewards join when one is asked."""
    system = compose_system_prompt(cfg, default_system)
    rewards = (correctness,) if cfg.prompt_format == "plain" else (correctness, "format_tags")
    return Task(
        name=name,
        train=train,
        eval=eval_,
        system_prompt=system,
        default_rewards=rewards,
        prompt_format=cfg.prompt_format,
        strict_reward=strict,
        solve=solve,
    )


def compose_system_prompt(cfg, default_system: str | None) -> str | None:
    """The configured system prompt ('default' = the task's own) followed by the answer-format instructions."""
    system = default_system if cfg.system_prompt == "default" else cfg.system_prompt
    instructions = FORMAT_INSTRUCTIONS[cfg.prompt_format]
    if instructions:
        system = f"{system}\n{instructions}" if system else instructions
    return system


def split_off_eval(problems: list[Problem], num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): a seeded shuffle, then the first num_eval held out. Duplicated prompts stay on one side."""
    from graft.config import ConfigError

    unique = list(dict.fromkeys(p.prompt for p in problems))
    if len(unique) <= num_eval:
        raise ConfigError(
            f"only {len(unique)} distinct problems, not enough for task.num_eval={num_eval} held out plus "
            "training; lower task.num_eval or give a separate eval file/split"
        )
    random.Random(seed).shuffle(unique)
    held = set(unique[:num_eval])
    return [p for p in problems if p.prompt not in held], [p for p in problems if p.prompt in held]
