"""Reward functions. Signature (as TRL's): f(prompts, completions, **columns) -> list[float | None]."""

from __future__ import annotations

from graft.rewards.builtin import BUILTIN_REWARDS, last_integer
from graft.rewards.runtime import RewardRuntime, load_reward

__all__ = ["BUILTIN_REWARDS", "RewardRuntime", "last_integer", "load_reward"]
