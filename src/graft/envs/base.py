"""The environment interface of multi-turn episodes: what a user subclasses to put a game, a tool or a user
simulator between the model's turns. graft makes one instance per episode, so an episode's state lives on
`self`; the instance never sees token ids (graft tokenizes its text once, where it enters the sequence)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepResult:
    observation: str | None  # the next user message; ignored (may be None) when done
    done: bool = False  # the episode is over: no further model turn
    info: dict = field(default_factory=dict)  # what rewards and metrics need, e.g. {"solved": True}


class Environment:
    """Subclass and implement reset and step; set system_prompt to open each episode with one."""

    system_prompt: str | None = None

    def reset(self, row: dict) -> str:
        """Start an episode for a dataset row (its columns); return the first user message."""
        raise NotImplementedError

    def step(self, reply: str) -> StepResult:
        """React to the model's reply (its text, without the end-of-turn token)."""
        raise NotImplementedError
