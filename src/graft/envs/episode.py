"""What happened in each episode of a multi-turn rollout (graft.rollout.episodes): the texts and ids of
every turn, what the environment said and reported, and how the episode ended. Plain data, so rewards
running in worker processes can take it, and records can write it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from graft.batch import Rollout
from graft.envs.guard import Failure


@dataclass
class Episode:
    """What happened in one episode, for rewards, metrics and records. Turn k of the model is replies[k]
    (ids reply_ids[k], its stop token last unless the turn was cut); the environment answered it with
    observations[k] / infos[k], and env_ids[k] are the ids that entered the sequence after it (absent for
    the last turn: the episode ended there)."""

    row: dict
    system_prompt: str | None = None
    first_message: str | None = None  # reset's text
    replies: list[str] = field(default_factory=list)
    reply_ids: list[list[int]] = field(default_factory=list)
    observations: list[str | None] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    env_ids: list[list[int]] = field(default_factory=list)
    done: bool = False  # the environment ended it
    truncated: str | None = None  # the limit that ended it: max_new_tokens | max_turns | max_episode_tokens
    failure: Failure | None = None  # an environment or template failure ended it

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def num_turns(self) -> int:
        return len(self.replies)

    @property
    def info(self) -> dict:
        """The environment's last info (its final state when it ended the episode)."""
        return self.infos[-1] if self.infos else {}

    def completion_ids(self) -> list[int]:
        """The ids after the prompt: reply, environment, reply, ... (what the rollout holds for this row)."""
        ids: list[int] = []
        for k, reply in enumerate(self.reply_ids):
            ids += reply + (self.env_ids[k] if k < len(self.env_ids) else [])
        return ids

    def completion_messages(self) -> list[dict[str, str]]:
        """The turns after the prompt as chat messages (TRL's multi-turn completion): the assistant's
        replies and the user turns the environment added to the conversation."""
        messages = []
        for k, reply in enumerate(self.replies):
            messages.append({"role": "assistant", "content": reply})
            if k < len(self.env_ids):
                messages.append({"role": "user", "content": self.observations[k]})
        return messages

    def messages(self) -> list[dict[str, str]]:
        """The whole conversation: system prompt, first user message, then completion_messages()."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if self.first_message is not None:
            head.append({"role": "user", "content": self.first_message})
        return head + self.completion_messages()


@dataclass
class EpisodeBatch:
    rollout: Rollout  # (B, ...) with loss_mask set; a group's episodes are adjacent
    episodes: list[Episode]  # (B,)

    @property
    def failed(self) -> torch.Tensor:  # (B,) bool: leave these out of the group baseline and the loss
        return torch.tensor([e.failed for e in self.episodes], dtype=torch.bool)

    def failure_counts(self) -> dict[str, int]:
        return dict(Counter(e.failure.kind for e in self.episodes if e.failure is not None))

    def metrics(self) -> dict[str, float]:
        n = max(1, len(self.episodes))
        out = {
            "episodes/turns": sum(e.num_turns for e in self.episodes) / n,
            "episodes/done": sum(e.done for e in self.episodes) / n,
            "episodes/truncated": sum(e.truncated is not None for e in self.episodes) / n,
            "episodes/failed": sum(e.failed for e in self.episodes) / n,
            "episodes/env_tokens": sum(len(i) for e in self.episodes for i in e.env_ids) / n,
        }
        out.update({f"episodes/failed_{kind}": float(c) for kind, c in self.failure_counts().items()})
        return out


def as_row(row) -> dict:
    """A dataset row as the environment's reset sees it: a mapping as it is, a graft Problem as its prompt,
    answer and extra columns."""
    if isinstance(row, Mapping):
        return dict(row)
    if all(hasattr(row, a) for a in ("prompt", "answer", "columns")):
        return {"prompt": row.prompt, "answer": row.answer, **row.columns}
    raise TypeError(f"an episode row must be a dict or a graft Problem, got {type(row).__name__}")
