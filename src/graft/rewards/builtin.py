from __future__ import annotations

import re
from collections.abc import Callable

RewardFn = Callable[..., list[float | None]]

# A number not glued to a preceding letter or digit; thousands separators ("1,234") and decimals allowed.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")


def extract_last_integer(text: str) -> int | None:
    """The last number in the text if it is an integer ('42', '1,234', '42.0'), else None ('3.5')."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    whole, _, frac = matches[-1].replace(",", "").partition(".")
    if frac.strip("0"):
        return None
    return int(whole)


def last_integer(prompts: list, completions: list[str], answer: list[str], **_columns) -> list[float]:
    """1.0 when the last integer in the completion equals the gold answer, else 0.0."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        got = extract_last_integer(completion)
        rewards.append(1.0 if got is not None and str(got) == str(gold).strip() else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {"last_integer": last_integer}
