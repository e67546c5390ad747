"""Reward functions. Signature (as TRL's): f(prompts, completions, **columns) -> list[float | None]."""

from __future__ import annotations

from graft.rewards.builtin import BUILTIN_REWARDS, last_integer, resolve_rewards

__all__ = ["BUILTIN_REWARDS", "last_integer", "resolve_rewards"]
