"""Prompts against the model's context: a prompt plus generation.max_new_tokens must fit in the positions
the model has (max_position_embeddings), or a step runs away (a 20k-token prompt on an 8k model grew to
16 GB and did not finish a step in 11 minutes). Measured with the tokenizer alone, before any weights load;
what happens to the ones that do not fit is task.long_prompts: error (naming them), truncate or drop."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from graft.config import Config, ConfigError
from graft.tasks.base import Problem, Task

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
MARGIN = 8  # tokens a normaliser may add to a prompt beyond one per byte


def context_length(model_config) -> int | None:
    """Positions the model has, from its config (None when it does not say)."""
    if model_config is None:
        return None
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_length(tokenizer, task: Task, problem: Problem) -> int:
    from graft.evaluation import encode_messages

    return len(encode_messages(tokenizer, task.messages(problem)))


@dataclass
class PromptFit:
    """What the check found: the longest prompt (tokens, template included), the limit, and notes/problems."""

    longest: int
    limit: int | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fit_prompts(
    cfg: Config, task: Task, tokenizer, context: int | None, source: str = "the model"
) -> PromptFit:
    """Measure the task's prompts (train and held-out) against `context` minus the longest completion the
    run asks for, and apply task.long_prompts to the ones that do not fit (task is changed in place for
    truncate and drop). Only prompts that could be too long are tokenized: a token covers at least one
    byte, so a prompt of fewer bytes than the room left cannot overflow."""
    empty = prompt_length(tokenizer, task, Problem("", ""))  # system prompt + chat template
    new_tokens = max(cfg.generation.max_new_tokens, cfg.eval.max_new_tokens or 0)
    limit = None if context is None else context - new_tokens
    fit = PromptFit(empty, limit)
    if limit is not None and empty >= limit:
        fit.problems.append(
            f"'generation.max_new_tokens': {source} has {context} positions; {new_tokens} new tokens and the "
            f"chat template with its system prompt ({empty} tokens) leave no room for a prompt: lower "
            "generation.max_new_tokens / eval.max_new_tokens or shorten task.system_prompt"
        )
        return fit
    over: dict[str, list[tuple[int, int]]] = {"train": [], "eval": []}
    for split in over:
        problems = getattr(task, split)
        by_bytes = sorted(range(len(problems)), key=lambda i: -len(problems[i].prompt.encode()))
        for rank, i in enumerate(by_bytes):
            bound = empty + len(problems[i].prompt.encode()) + MARGIN
            if (limit is None or bound <= limit) and rank >= 16:
                break  # the rest fit for sure; the 16 longest were measured for the memory estimate
            n = prompt_length(tokenizer, task, problems[i])
            fit.longest = max(fit.longest, n)
            if limit is not None and n > limit:
                over[split].append((i, n))
    count = sum(len(v) for v in over.values())
    if not count:
        return fit
    mode = cfg.task.long_prompts
    head = (
        f"{count} prompt(s) longer than {source}'s context allows ({context} positions - {new_tokens} new "
        f"tokens = {limit} for a prompt, chat template included)"
    )
    if mode == "error":
        where = _locate(cfg, task, over)
        shown = "; ".join(where[:5]) + (f"; ... and {count - 5} more" if count > 5 else "")
        fit.problems.append(
            f"'task.long_prompts': {head}: {shown}. Set task.long_prompts=truncate (keep each prompt's end) "
            "or drop, shorten those prompts, or lower generation.max_new_tokens"
        )
        return fit
    for split, rows in over.items():
        problems = getattr(task, split)
        bad = {i for i, _ in rows}
        if mode == "drop":
            setattr(task, split, [p for i, p in enumerate(problems) if i not in bad])
        else:
            for i in bad:
                problems[i] = _truncate(tokenizer, task, problems[i], limit, empty)
    fit.longest = min(fit.longest, limit)
    verb = "dropped" if mode == "drop" else "cut to their last tokens"
    fit.notes.append(f"task.long_prompts={mode}: {head}, {verb}")
    for split in ("train", "eval"):
        if not getattr(task, split):
            fit.problems.append(
                f"'task.long_prompts': dropping the prompts longer than {limit} tokens left no "
                f"{'training' if split == 'train' else 'held-out'} problem; use task.long_prompts=truncate"
            )
    return fit


def _truncate(tokenizer, task: Task, problem: Problem, limit: int, empty: int) -> Problem:
    """The problem with its prompt cut to its last tokens so the templated prompt fits in `limit`."""
    from dataclasses import replace

    ids = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    keep = limit - empty
    for _ in range(4):  # decoding and encoding again may not give the same count: cut until it fits
        cut = replace(problem, prompt=tokenizer.decode(ids[-keep:]) if keep > 0 else "")
        excess = prompt_length(tokenizer, task, cut) - limit
        if excess <= 0:
            return cut
        keep -= excess
    raise ConfigError(
        f"task.long_prompts=truncate: cannot fit the prompt {problem.prompt[:60]!r} in {limit} tokens"
    )


def _locate(cfg: Config, task: Task, over: dict[str, list[tuple[int, int]]]) -> list[str]:
    """'file:line (N tokens, 'start...')' for each over-long prompt: the JSONL line when the task reads one."""
    lines: dict[str, str] = {}
    for path in (cfg.task.path, cfg.task.eval_path) if cfg.task.name == "jsonl" else ():
        if path is None:
            continue
        column = cfg.task.prompt_column or "prompt"
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            try:
                prompt = json.loads(line).get(column)
            except (ValueError, AttributeError):
                continue
            if isinstance(prompt, str):
                lines.setdefault(prompt, f"{path}:{number}")
    out = []
    for split, rows in over.items():
        for i, n in sorted(rows, key=lambda r: -r[1]):
            prompt = getattr(task, split)[i].prompt
            where = lines.get(prompt, f"{'training' if split == 'train' else 'held-out'} problem {i}")
            out.append(f"{where} ({n} tokens, {prompt[:40]!r}...)")
    return out
