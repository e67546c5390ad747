"""A task = problems (prompt + checkable answer) split into train and held-out eval, and default rewards."""

from __future__ import annotations

from graft.config import ConfigError, TaskConfig
from graft.tasks.base import Problem, Task


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name == "arithmetic":
        from graft.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(cfg)
    raise ConfigError(f"unknown task '{cfg.name}'")


__all__ = ["Problem", "Task", "build_task"]
