"""Generated integer arithmetic: seeded, difficulty set by operand range and operations, and a held-out
split that never shares a problem with training."""

from __future__ import annotations

import operator
import random

from graft.config import ConfigError, TaskConfig
from graft.tasks.base import Problem, Task, make_task

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _problem(a: int, op: str, b: int) -> Problem:
    return Problem(prompt=f"What is {a} {op} {b}?", answer=str(_OPS[op](a, b)))


def _solve(problem: Problem) -> tuple[str, str, str]:
    expression = problem.prompt.removeprefix("What is ").removesuffix("?")
    return f"{expression} = {problem.answer}", problem.answer, problem.answer


SYSTEM = "Solve the arithmetic problem. End your reply with the final answer as a plain integer."


def arithmetic_task(cfg: TaskConfig) -> Task:
    lo, hi, ops = cfg.min_operand, cfg.max_operand, list(cfg.operations)
    space = (hi - lo + 1) ** 2 * len(ops)
    if space <= cfg.num_eval:
        raise ConfigError(
            f"operands {lo}..{hi} with {ops} give only {space} distinct problems, not enough for "
            f"task.num_eval={cfg.num_eval} held-out ones plus training; widen the operand range"
        )
    rng = random.Random(cfg.seed)
    wanted = min(space, cfg.num_eval + cfg.num_train)
    if space <= 4 * wanted:  # small space: enumerate and shuffle (rejection sampling would crawl)
        triples = [(a, op, b) for a in range(lo, hi + 1) for op in ops for b in range(lo, hi + 1)]
        rng.shuffle(triples)
        triples = triples[:wanted]
    else:
        seen: set[tuple[int, str, int]] = set()
        triples = []
        while len(triples) < wanted:
            t = (rng.randint(lo, hi), rng.choice(ops), rng.randint(lo, hi))
            if t not in seen:
                seen.add(t)
                triples.append(t)
    problems = [_problem(*t) for t in triples]
    # When the space is smaller than num_train + num_eval, training gets every problem not held out.
    return make_task(
        cfg,
        "arithmetic",
        problems[cfg.num_eval :],
        problems[: cfg.num_eval],
        SYSTEM,
        "last_integer",
        solve=_solve,
    )
