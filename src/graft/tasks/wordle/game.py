"""Wordle as pure functions and a small game state: scoring a guess, rendering feedback, reading the
model's <guess> tag, and the texts an environment shows the model. No model, no torch."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from graft.tasks.wordle.words import WORD_LENGTH, valid_guesses

CORRECT, PRESENT, ABSENT = "correct", "present", "absent"
MAX_GUESSES = 6
Feedback = tuple[str, ...]
DEFAULT_SYMBOLS: Mapping[str, str] = {CORRECT: "✔", PRESENT: "-", ABSENT: "❌"}

# Why a reply is not a playable guess (guess_problem's answers), from worst to nearly right.
NO_TAG = "no <guess> tag"
NOT_LETTERS = "letters a-z only"
BAD_LENGTH = f"not {WORD_LENGTH} letters"
NOT_A_WORD = "not in the word list"

_GUESS_TAG = re.compile(r"<guess>(.*?)</guess>", re.DOTALL | re.IGNORECASE)
_LETTERS = re.compile(r"[a-z]*")  # empty passes here, to be told apart as the wrong length


def score_guess(secret: str, guess: str) -> Feedback:
    """Per-letter feedback. Greens are taken first; a yellow is given only while the secret still has an
    unmatched copy of that letter, left to right, so a letter is never marked more often than it occurs."""
    if len(secret) != len(guess):
        raise ValueError(f"secret and guess differ in length: {secret!r} {guess!r}")
    marks = [ABSENT] * len(guess)
    unmatched = Counter(s for s, g in zip(secret, guess, strict=True) if s != g)
    for i, (s, g) in enumerate(zip(secret, guess, strict=True)):
        if s == g:
            marks[i] = CORRECT
        elif unmatched[g] > 0:
            marks[i] = PRESENT
            unmatched[g] -= 1
    return tuple(marks)


def render_feedback(guess: str, feedback: Feedback, symbols: Mapping[str, str] = DEFAULT_SYMBOLS) -> str:
    """'C ✔ R ❌ A - N ❌ E ✔': each letter (upper case, so it never reads as a symbol) then its mark."""
    return " ".join(f"{letter.upper()} {symbols[mark]}" for letter, mark in zip(guess, feedback, strict=True))


def parse_guess(text: str) -> str | None:
    """The inside of the last <guess>...</guess>, stripped and lower-cased, or None when there is no tag.
    The last tag counts, so a model may think aloud about other words first."""
    tags = _GUESS_TAG.findall(text)
    return tags[-1].strip().lower() if tags else None


def check_guess(guess: str | None, words: Collection[str] | None = None) -> str | None:
    """Why a parsed guess is not playable (one of NO_TAG, NOT_LETTERS, BAD_LENGTH, NOT_A_WORD), or None."""
    if guess is None:
        return NO_TAG
    if not _LETTERS.fullmatch(guess):
        return NOT_LETTERS
    if len(guess) != WORD_LENGTH:
        return BAD_LENGTH
    if guess not in (valid_guesses() if words is None else words):
        return NOT_A_WORD
    return None


def guess_problem(text: str, words: Collection[str] | None = None) -> str | None:
    """Why a reply holds no playable guess, or None when it does."""
    return check_guess(parse_guess(text), words)


def is_consistent(word: str, history: Iterable[tuple[str, Feedback]]) -> bool:
    """Could `word` be the secret, given the feedback so far? Exact: the secret reproduces every feedback."""
    return all(score_guess(word, guess) == tuple(feedback) for guess, feedback in history)


def consistent_candidates(history: Sequence[tuple[str, Feedback]], words: Iterable[str]) -> list[str]:
    """The words that are still possible secrets, in the order given."""
    return [w for w in words if is_consistent(w, history)]


@dataclass(frozen=True)
class Turn:
    text: str  # the reply as the model wrote it (or the bare guess)
    guess: str | None  # parsed from the reply; None when it had no <guess> tag
    feedback: Feedback | None  # None when the guess was not playable
    problem: str | None = None  # why not playable

    @property
    def valid(self) -> bool:
        return self.feedback is not None


@dataclass
class WordleGame:
    """One game. An unplayable reply still costs a guess: a game always ends within max_guesses replies,
    and a model cannot stall by writing nonsense."""

    secret: str
    max_guesses: int = MAX_GUESSES
    words: Collection[str] | None = None  # valid guesses; None: the shipped list
    turns: list[Turn] = field(default_factory=list)

    @property
    def history(self) -> list[tuple[str, Feedback]]:
        """(guess, feedback) of the playable turns."""
        return [(t.guess, t.feedback) for t in self.turns if t.feedback is not None]

    @property
    def solved(self) -> bool:
        return bool(self.turns) and self.turns[-1].guess == self.secret and self.turns[-1].valid

    @property
    def over(self) -> bool:
        return self.solved or len(self.turns) >= self.max_guesses

    @property
    def guesses_left(self) -> int:
        return max(0, self.max_guesses - len(self.turns))

    def play(self, guess: str | None, text: str | None = None) -> Turn:
        """Check and record one guess (None: the reply had no tag)."""
        if self.over:
            raise RuntimeError("the game is over")
        guess = guess.strip().lower() if guess is not None else None
        problem = check_guess(guess, self.words)
        feedback = score_guess(self.secret, guess) if problem is None else None
        turn = Turn(text if text is not None else guess or "", guess, feedback, problem)
        self.turns.append(turn)
        return turn

    def step(self, text: str, symbols: Mapping[str, str] = DEFAULT_SYMBOLS) -> str:
        """Play the model's reply and return what the environment shows it next."""
        return observation(self, self.play(parse_guess(text), text), symbols)


def observation(game: WordleGame, turn: Turn, symbols: Mapping[str, str] = DEFAULT_SYMBOLS) -> str:
    """The environment's reply to a turn: the feedback line (or why the guess was refused) and what is left."""
    if turn.feedback is None:
        line = f"Invalid guess ({turn.problem})."
    else:
        line = render_feedback(turn.guess or "", turn.feedback, symbols)
    if game.solved:
        n = len(game.turns)
        return f"{line}\nSolved in {n} guess{'es' if n > 1 else ''}!"
    if game.over:
        return f"{line}\nNo guesses left. The word was {game.secret.upper()}."
    left = game.guesses_left
    return f"{line}\n{left} guess{'es' if left > 1 else ''} left."


def instructions(symbols: Mapping[str, str] = DEFAULT_SYMBOLS, max_guesses: int = MAX_GUESSES) -> str:
    """The first-turn prompt: rules, marks and the reply format, short enough for a small model's context."""
    c, p, a = symbols[CORRECT], symbols[PRESENT], symbols[ABSENT]
    example = render_feedback("crane", score_guess("caste", "crane"), symbols)
    return (
        f"Let's play Wordle. Find the secret {WORD_LENGTH}-letter English word in {max_guesses} guesses.\n"
        "Reply with one guess in this form: <guess>crane</guess>\n"
        "After each guess every letter gets a mark:\n"
        f"{c} right letter, right spot\n"
        f"{p} in the word, but in another spot\n"
        f"{a} not in the word\n"
        f"Example: {example} means C and E are right, A is elsewhere, R and N are not in the word.\n"
        "Use every mark in your next guess."
    )
