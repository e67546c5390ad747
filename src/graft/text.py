"""Reading answers out of completion text: the pieces the rewards, the tasks and the evaluation share.
A leaf module (no graft imports), so rewards and tasks can both use it without importing each other."""

from __future__ import annotations

import re

# A number not glued to a preceding letter or digit; thousands separators ("1,234") and decimals allowed.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion) -> str:
    """Plain text of a completion given as a string or as chat messages (TRL's conversational form): the
    last assistant message (a multi-turn episode ends with the environment's turn, or may have no reply
    at all when its environment broke at once: then "")."""
    if isinstance(completion, str):
        return completion
    replies = [m["content"] for m in completion if m.get("role", "assistant") == "assistant"]
    return replies[-1] if replies else ""


def extract_last_integer(text: str) -> int | None:
    """The last number in the text if it is an integer ('42', '1,234', '42.0'), else None ('3.5')."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    whole, _, frac = matches[-1].replace(",", "").partition(".")
    if frac.strip("0"):
        return None
    return int(whole)


def extract_last_number(text: str) -> float | None:
    """The last number in the text ('$' and thousands separators ignored), or None."""
    matches = _NUMBER.findall(text.replace("$", ""))
    return float(matches[-1].replace(",", "")) if matches else None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces matched (MATH solutions nest them)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def answer_block(text: str) -> str | None:
    """The inside of the last <answer>...</answer>, or None when there is none."""
    blocks = _ANSWER_BLOCK.findall(text)
    return blocks[-1].strip() if blocks else None
