"""A task = problems (prompt + checkable answer) split into train and held-out eval, and default rewards."""

from __future__ import annotations

from graft.config import TaskConfig
from graft.tasks.base import Problem, Task


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name == "arithmetic":
        from graft.tasks.arithmetic import arithmetic_task

        return arithmetic_task(cfg)
    if cfg.name == "countdown":
        from graft.tasks.countdown import countdown_task

        return countdown_task(cfg)
    if cfg.name == "wordle":
        from graft.tasks.wordle.task import wordle_task

        return wordle_task(cfg)
    from graft.tasks.datasets import dataset_task

    return dataset_task(cfg)


def system_prompt(cfg: TaskConfig) -> str | None:
    """The system prompt a task's runs use, without reading its data (for generate, chat and compare)."""
    from graft.tasks.base import compose_system_prompt

    if cfg.name == "arithmetic":
        from graft.tasks.arithmetic import SYSTEM
    elif cfg.name == "countdown":
        from graft.tasks.countdown import SYSTEM
    elif cfg.name == "wordle":
        from graft.envs.wordle import WordleEnv

        SYSTEM = WordleEnv.system_prompt
    else:
        from graft.tasks.datasets import DEFAULTS

        SYSTEM = DEFAULTS[cfg.name][5]
    return compose_system_prompt(cfg, SYSTEM)


__all__ = ["Problem", "Task", "build_task", "environment_spec", "system_prompt"]


def environment_spec(cfg: TaskConfig) -> str | None:
    """The multi-turn environment a task's rows start (task.environment, else the task's own), or None for
    single-turn tasks."""
    return cfg.environment or ("wordle" if cfg.name == "wordle" else None)
