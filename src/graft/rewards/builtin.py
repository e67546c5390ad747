from __future__ import annotations

import math
import re
from collections.abc import Callable

from graft.text import completion_text, extract_last_integer, extract_last_number

RewardFn = Callable[..., list[float | None]]


def last_integer(prompts: list, completions: list[str], answer: list[str], **_columns) -> list[float]:
    """1.0 when the last integer in the completion equals the gold answer, else 0.0."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        got = extract_last_integer(completion_text(completion))
        rewards.append(1.0 if got is not None and str(got) == str(gold).strip() else 0.0)
    return rewards


def _number(gold) -> float | None:
    try:
        return float(str(gold).replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


_GSM8K_STRICT = re.compile(r"#### (-?[0-9.,]+)")


def gsm8k_strict(prompts, completions, answer, **_columns) -> list[float]:
    """1.0 when the completion states '#### <number>' (GSM8K's own answer format) and the number is right."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        found = _GSM8K_STRICT.search(completion_text(completion))
        got = _number(found.group(1).rstrip(".")) if found else None
        out.append(1.0 if got is not None and got == _number(gold) else 0.0)
    return out


def gsm8k_flexible(prompts, completions, answer, **_columns) -> list[float]:
    """1.0 when the last number in the completion equals the gold number ('$1,200.00' reads as 1200)."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        got = extract_last_number(completion_text(completion))
        out.append(1.0 if got is not None and got == _number(gold) else 0.0)
    return out


def math_equivalence(prompts, completions, answer, **_columns) -> list[float]:
    """1.0 when math-verify finds the completion's final answer (\\boxed{} or last expression) equivalent to
    the gold answer: 0.5 = 1/2 = \\frac{1}{2}. Runs in a worker process (odd LaTeX can hang the parser)."""
    from math_verify import parse, verify

    out = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = str(gold) if ("$" in str(gold) or "\\boxed" in str(gold)) else f"${gold}$"
        parsed_gold, parsed = parse(gold_text), parse(completion_text(completion))
        out.append(1.0 if parsed_gold and parsed and verify(parsed_gold, parsed) else 0.0)
    return out


def numeric_proximity(prompts, completions, answer, **_columns) -> list[float]:
    """Continuous credit 1 / (1 + |got - gold| / max(1, |gold|)): a near miss scores more than a wild guess,
    which gives a signal even when no completion in a group is exactly right. No number: 0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        got, want = extract_last_number(completion_text(completion)), _number(gold)
        out.append(
            0.0 if got is None or want is None else 1.0 / (1.0 + abs(got - want) / max(1.0, abs(want)))
        )
    return out


_STRICT = re.compile(r"^\s*<(reasoning|think)>\n.+?\n</\1>\n<answer>\n.+?\n</answer>\s*$", re.DOTALL)
_SOFT = re.compile(r"<(reasoning|think)>.+?</\1>\s*<answer>.+?</answer>", re.DOTALL)


def format_strict(prompts, completions, **_columns) -> list[float]:
    """1.0 for exactly '<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>' (or <think>), nothing else."""
    return [1.0 if _STRICT.match(completion_text(c)) else 0.0 for c in completions]


def format_soft(prompts, completions, **_columns) -> list[float]:
    """1.0 when a reasoning (or think) block is followed by an answer block, whatever the spacing around."""
    return [1.0 if _SOFT.search(completion_text(c)) else 0.0 for c in completions]


def format_tags(prompts, completions, **_columns) -> list[float]:
    """Partial credit, 0.25 per tag that appears exactly once (<reasoning>/<think>, its close, <answer>,
    </answer>), minus 0.001 per character after </answer>: a gradient toward the format from scratch."""
    out = []
    for completion in completions:
        text = completion_text(completion)
        tag = "think" if text.count("<think>") > text.count("<reasoning>") else "reasoning"
        score = sum(0.25 for t in (f"<{tag}>", f"</{tag}>", "<answer>", "</answer>") if text.count(t) == 1)
        if text.count("</answer>") == 1:
            score -= 0.001 * len(text.split("</answer>")[-1].strip())
        out.append(score)
    return out


def soft_overlong(prompts, completions, completion_ids, max_completion_length, **_columns) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to L_max - L_cache tokens, then falling linearly to -1 at L_max
    (L_cache = L_max / 4), so truncation is discouraged before it happens."""
    out = []
    for ids, limit in zip(completion_ids, max_completion_length, strict=True):
        cache = max(1, limit // 4)
        out.append(min(0.0, (limit - cache - len(ids)) / cache) if len(ids) < limit else -1.0)
    return out


def cosine_length(
    prompts, completions, answer, completion_ids, max_completion_length, **_columns
) -> list[float]:
    """Correctness scaled by length on a cosine ('Demystifying long chain-of-thought'): a right answer earns
    1.0 when short down to 0.5 at the limit; a wrong one -1.0 when short up to -0.5 at the limit, so the
    model is paid to think longer only when it would otherwise be wrong."""
    right = gsm8k_flexible(prompts, completions, answer)
    out = []
    for ok, ids, limit in zip(right, completion_ids, max_completion_length, strict=True):
        lo, hi = (0.5, 1.0) if ok else (-0.5, -1.0)
        out.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * min(len(ids), limit) / limit)))
    return out


def repetition_penalty(prompts, completions, **_columns) -> list[float]:
    """-(share of repeated word 3-grams): 0 for text without repeats, toward -1 for a loop."""
    out = []
    for completion in completions:
        words = completion_text(completion).lower().split()
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "last_integer": last_integer,
    "gsm8k_strict": gsm8k_strict,
    "gsm8k_flexible": gsm8k_flexible,
    "math_equivalence": math_equivalence,
    "numeric_proximity": numeric_proximity,
    "format_strict": format_strict,
    "format_soft": format_soft,
    "format_tags": format_tags,
    "soft_overlong": soft_overlong,
    "cosine_length": cosine_length,
    "repetition_penalty": repetition_penalty,
}


def _countdown(prompts, completions, numbers, target, **columns) -> list[float]:
    from graft.tasks.countdown import countdown

    return countdown(prompts, completions, numbers, target, **columns)


BUILTIN_REWARDS["countdown"] = _countdown


def _wordle(name: str) -> RewardFn:
    def reward(prompts, completions, secret, **columns) -> list[float]:
        from graft.tasks.wordle.rewards import WORDLE_REWARDS

        return WORDLE_REWARDS[name](prompts, completions, secret, **columns)

    reward.__name__ = name
    return reward


# multi-turn: a completion is the episode (its messages); the game is replayed from the secret
for _name in ("wordle_solved", "wordle_format", "wordle_feedback", "wordle_guess_value", "wordle_win"):
    BUILTIN_REWARDS[_name] = _wordle(_name)
# Built-ins that are plain regex and arithmetic, fast and unable to hang: they run in the trainer process.
# math_equivalence parses LaTeX with sympy, which can hang on odd input: it runs in a worker, with a timeout.
WORKER_REWARDS = frozenset({"math_equivalence"})


def runs_in_process(spec: str) -> bool:
    return spec in BUILTIN_REWARDS and spec not in WORKER_REWARDS
