"""What a run will call, checked without calling it: each user reward against the arguments rewards get,
gate.rewards against the rewards the run computes, lora.target_modules against the model's layers."""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable

from graft.config import Config


def reward_signature_problem(spec: str, fn: Callable, columns: list[str]) -> str | None:
    """Why `fn` cannot be called as the runtime calls rewards, fn(prompts=, completions=, <columns>=) (TRL's
    convention), or None. Only the signature is read: the function does not run."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a C function or a callable without a signature: cannot tell
        return None
    names = ["prompts", "completions", *columns]
    try:
        signature.bind(**dict.fromkeys(names))
    except TypeError as exc:
        return (
            f"reward '{spec}' cannot take the arguments rewards are called with ({exc}): graft calls "
            f"it as fn({', '.join(f'{n}=...' for n in names)}); give it those parameters by name and **kwargs "
            "for the ones it does not use, e.g. def fn(prompts, completions, answer, **kwargs)"
        )
    return None


def gate_problem(cfg: Config, functions: list[str], correctness: str) -> str | None:
    """gate.rewards must name rewards the run computes (by function name) or the task's correctness."""
    if not cfg.gate.enabled or not cfg.gate.rewards:
        return None
    known = sorted(set(functions) | {correctness})
    unknown = [g for g in cfg.gate.rewards if g not in known]
    if not unknown:
        return None
    close = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"'gate.rewards': {', '.join(map(repr, unknown))} is not a reward this run computes{hint}; use some "
        f"of {known} (the names of rewards.functions), or gate.enabled=false"
    )


def lora_target_problem(targets: str | list[str], names: dict[str, str]) -> str | None:
    """`names`: module name -> class name, for the modules LoRA can wrap (linear, embedding, conv). PEFT
    matches a list entry against the end of a module's name and a string as a regular expression."""
    if targets == "all-linear":
        return None
    leaves = sorted({n.rpartition(".")[2] for n in names})
    shown = ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            return f"'lora.target_modules': {targets!r} is neither 'all-linear' nor a valid regular expression ({exc})"
        if not any(pattern.fullmatch(n) for n in names):
            return (
                f"'lora.target_modules': the pattern {targets!r} matches no layer of this model (a string is "
                f"a regular expression over full module names); give a list of names such as {leaves[:2]}; "
                f"its layers: {shown}"
            )
        return None
    if not targets:
        return "'lora.target_modules' is empty; give 'all-linear' or module names such as [q_proj, v_proj]"
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return None
    close = difflib.get_close_matches(missing[0], leaves, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"'lora.target_modules': this model has no layer named {', '.join(map(repr, missing))}{hint}; its layers: {shown}"
