"""Generated integer arithmetic: seeded, difficulty set by operand range and operations, and a held-out
split that never shares a problem with training."""

from __future__ import annotations

import operator
import random

from graft.config import ConfigError, TaskConfig
from graft.tasks.base import Problem, Task, make_task

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}

Triple = tuple[int, str, int]  # (a, op, b)


def _phrase(template: str | dict[str, str], a: int, op: str, b: int) -> str | None:
    """The problem in one phrasing; None when the phrasing has no wording for this operation."""
    text = template.get(op) if isinstance(template, dict) else template
    return None if text is None else text.format(a=a, b=b, op=op, op_word=_OP_WORDS[op])


def problem_kind(a: int, op: str, b: int) -> str:
    """What the evaluations break accuracy down by: the operation, and the sign of a difference (a small
    model that has learned to subtract may still never answer below zero)."""
    if op != "-":
        return {"+": "addition", "*": "multiplication"}[op]
    return "subtraction below 0" if a < b else "subtraction"


def _problem(prompt: str, a: int, op: str, b: int) -> Problem:
    return Problem(prompt=prompt, answer=str(_OPS[op](a, b)), kind=problem_kind(a, op, b))


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
        seen: set[Triple] = set()
        triples = []
        while len(triples) < wanted:
            t = (rng.randint(lo, hi), rng.choice(ops), rng.randint(lo, hi))
            if t not in seen:
                seen.add(t)
                triples.append(t)
    held_out, training = triples[: cfg.num_eval], triples[cfg.num_eval :]
    # every phrasing of a training problem is trained on; held-out problems are asked in the first phrasing,
    # and again in the unseen ones (round robin over those that word the operation)
    expressions: dict[str, str] = {}

    def ask(template, t: Triple) -> Problem | None:
        prompt = _phrase(template, *t)
        if prompt is None:
            return None
        expressions[prompt] = f"{t[0]} {t[1]} {t[2]}"
        return _problem(prompt, *t)

    # phrasing by phrasing, so that the first problems (what the gate probes) are different problems
    train = [p for template in cfg.templates for t in training if (p := ask(template, t))]
    held = [ask(cfg.templates[0], t) for t in held_out]
    unseen: list[Problem] = []
    for i, t in enumerate(held_out):
        wording = [u for u in cfg.unseen_templates if _phrase(u, *t) is not None]
        if wording:
            unseen.append(ask(wording[i % len(wording)], t))
    if cfg.unseen_templates and not unseen:
        raise ConfigError("task.unseen_templates word none of task.operations; give a phrasing with {op}")

    def solve(problem: Problem) -> tuple[str, str, str]:
        return f"{expressions[problem.prompt]} = {problem.answer}", problem.answer, problem.answer

    # When the space is smaller than num_train + num_eval, training gets every problem not held out.
    task = make_task(cfg, "arithmetic", train, held, SYSTEM, "last_integer", solve=solve)
    task.unseen = unseen
    return task
