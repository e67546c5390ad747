"""Countdown: combine the given numbers with + - * / to reach the target. Generated so that every problem
has a solution; checked by a safe evaluator (an AST walk over numbers and four operators, never `eval`)."""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

from graft.config import TaskConfig
from graft.tasks.base import Problem, Task, make_task, split_off_eval
from graft.text import completion_text

SYSTEM = (
    "Use each of the given numbers exactly once with + - * / and parentheses to make the target. "
    "End your reply with the expression alone on the last line, e.g. (1 + 2) * 3."
)


def _solvable(rng: random.Random, numbers: list[int]) -> tuple[int, str] | None:
    """Combine the numbers in a random order with random operators: (target, the expression that makes it),
    or None if the value is not a positive int."""
    order = numbers[:]
    rng.shuffle(order)
    value = Fraction(order[0])
    expression = str(order[0])
    for n in order[1:]:
        op = rng.choice("+-*/")
        if op == "/" and (n == 0 or (value / n).denominator != 1):
            op = "+"
        value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n if n else value}[op]
        expression = (
            f"({expression}) {op} {n}" if op in "*/" and " " in expression else f"{expression} {op} {n}"
        )
    return (int(value), expression) if value.denominator == 1 and 0 < value <= 1000 else None


def countdown_task(cfg: TaskConfig) -> Task:
    rng = random.Random(cfg.seed)
    lo, hi = max(1, cfg.min_operand), max(2, cfg.max_operand)
    problems, seen, solutions = [], set(), {}
    attempts = 0
    while len(problems) < cfg.num_train + cfg.num_eval and attempts < 100 * (cfg.num_train + cfg.num_eval):
        attempts += 1
        numbers = sorted(rng.randint(lo, hi) for _ in range(cfg.num_numbers))
        solved = _solvable(rng, numbers)
        if solved is None or (tuple(numbers), solved[0]) in seen:
            continue
        target, expression = solved
        seen.add((tuple(numbers), target))
        prompt = f"Numbers: {', '.join(map(str, numbers))}. Target: {target}."
        solutions.setdefault(prompt, expression)
        problems.append(Problem(prompt, str(target), {"numbers": numbers, "target": target}))
    train, held = split_off_eval(problems, cfg.num_eval, cfg.seed)

    def solve(problem: Problem) -> tuple[str, str, str]:
        expression = solutions[problem.prompt]
        return f"{expression} = {problem.answer}", expression, expression

    return make_task(cfg, "countdown", train, held, SYSTEM, "countdown", solve=solve)


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def safe_value(expression: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, numbers used) of an arithmetic expression, or None if it is anything else."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None
    used: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div):
                if right == 0:
                    raise ZeroDivisionError
                return left / right
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        raise ValueError("not allowed")

    try:
        return walk(tree), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def extract_expression(text: str) -> str:
    """The <answer> block if there is one, else the last non-empty line; anything after '=' is dropped."""
    found = _ANSWER.findall(text)
    candidate = found[-1] if found else next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
    return candidate.split("=")[0].strip().strip("`$").strip()


def countdown(prompts, completions, numbers, target, **_columns) -> list[float]:
    """1.0 when the completion's expression uses each given number exactly once and equals the target."""
    out = []
    for completion, nums, goal in zip(completions, numbers, target, strict=True):
        result = safe_value(extract_expression(completion_text(completion)))
        ok = result is not None and sorted(result[1]) == sorted(nums) and result[0] == goal
        out.append(1.0 if ok else 0.0)
    return out
