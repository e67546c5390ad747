"""Environments for multi-turn episodes: the interface (Environment, StepResult), finding one from a config
string (load_environment), and the built-ins (wordle, guess_number). The sampler that plays episodes with a
model is graft.rollout.episodes."""

from graft.envs.base import Environment, StepResult
from graft.envs.loading import BUILTIN_ENVIRONMENTS, EnvironmentSpecError, load_environment

__all__ = ["BUILTIN_ENVIRONMENTS", "Environment", "EnvironmentSpecError", "StepResult", "load_environment"]
