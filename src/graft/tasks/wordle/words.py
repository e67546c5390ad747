"""The shipped Wordle word lists (SCOWL selections, see data/NOTICE.md): a pool of common secret words and a
larger list of valid guesses. Read once, cached; no download ever."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
ANSWERS_FILE = DATA_DIR / "answers.txt"
GUESSES_FILE = DATA_DIR / "guesses.txt"
WORD_LENGTH = 5
_WORD = re.compile(r"[a-z]{5}")


def read_word_list(path: Path) -> tuple[str, ...]:
    """Words of a list file, one a line; '#' lines and blank lines skipped. Raises on a malformed word, so a
    broken regeneration fails loudly instead of letting odd entries into games."""
    words = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if not _WORD.fullmatch(word):
            raise ValueError(f"{path.name}:{n}: {word!r} is not five lowercase letters a-z")
        words.append(word)
    return tuple(words)


@lru_cache(maxsize=1)
def answers() -> tuple[str, ...]:
    """The secret-word pool (~2k common words), sorted."""
    return read_word_list(ANSWERS_FILE)


@lru_cache(maxsize=1)
def valid_guesses() -> frozenset[str]:
    """Every word accepted as a guess (~6.5k); includes every answer."""
    return frozenset(read_word_list(GUESSES_FILE)) | frozenset(answers())


def is_valid_guess(word: str) -> bool:
    return word in valid_guesses()
