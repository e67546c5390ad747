"""Wordle rewards and evaluation metrics, each a pure function of an episode.

Shape as TRL's (batched): f(prompts, completions, secret, **columns) -> list[float], one value in [0, 1] per
episode. A completion is the model's turns of one game: a list of reply texts, chat messages (the assistant
ones are the turns), or one string for single-turn use. The game is replayed from `secret` and the parsed
guesses alone; feedback shown in prompts is never trusted. An optional `history` column gives, per episode,
guesses already played before the model's first turn (single-turn training on mid-game states); they are
replayed too, and only the model's own turns are scored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from graft.tasks.wordle.game import (
    ABSENT,
    BAD_LENGTH,
    CORRECT,
    NO_TAG,
    NOT_A_WORD,
    NOT_LETTERS,
    PRESENT,
    Feedback,
    WordleGame,
    is_consistent,
    parse_guess,
)
from graft.tasks.wordle.solver import pattern_table
from graft.tasks.wordle.words import answers

# Format credit by what is wrong with a turn's guess: a near miss earns part, so that there is a gradient
# toward the format before any reply is fully right.
FORMAT_CREDIT = {None: 1.0, NOT_A_WORD: 0.5, BAD_LENGTH: 0.25, NOT_LETTERS: 0.25, NO_TAG: 0.0}


def turn_texts(completion) -> list[str]:
    """The model's turns: a string is one turn; chat messages give their assistant contents."""
    if isinstance(completion, str):
        return [completion]
    turns = list(completion)
    if turns and isinstance(turns[0], dict):
        return [m["content"] for m in turns if m.get("role", "assistant") == "assistant"]
    return [str(t) for t in turns]


def replay(
    secret: str, completion, history: Sequence[str] = (), words: Collection[str] | None = None
) -> tuple[WordleGame, int]:
    """(the game after the history guesses and the model's turns, index of the model's first turn). Turns
    past the game's end (solved, or out of guesses) are dropped: the environment would not have asked."""
    game = WordleGame(secret.strip().lower(), words=words)
    for guess in history:
        if not game.over:
            game.play(guess)
    first = len(game.turns)
    for text in turn_texts(completion):
        if game.over:
            break
        game.play(parse_guess(text), text)
    return game, first


def _episodes(completions, secret, history):
    histories = history if history is not None else [()] * len(completions)
    for completion, s, h in zip(completions, secret, histories, strict=True):
        yield replay(s, completion, h or ())


def _mean(values: list[float], empty: float) -> float:
    return sum(values) / len(values) if values else empty


def wordle_format(prompts, completions, secret, history=None, **_columns) -> list[float]:
    """Mean over the model's turns of: 1 for a <guess> tag holding a real 5-letter word, 0.5 for 5 letters
    that are not a word, 0.25 for a tag holding the wrong length or non-letters, 0 for no tag."""
    return [
        _mean([FORMAT_CREDIT[t.problem] for t in game.turns[first:]], 0.0)
        for game, first in _episodes(completions, secret, history)
    ]


def _knowledge(history: Sequence[tuple[str, Feedback]]):
    """What earlier feedback proves: greens {position: letter}; for each letter seen in the secret, the
    least number of copies and the positions it is known not to be at; letters known absent altogether."""
    greens: dict[int, str] = {}
    least: dict[str, int] = {}
    wrong: dict[str, set[int]] = {}
    marked_absent: set[str] = set()
    for guess, feedback in history:
        seen: dict[str, int] = {}
        for i, (letter, mark) in enumerate(zip(guess, feedback, strict=True)):
            if mark == CORRECT:
                greens[i] = letter
            else:  # present or absent: either way this letter is not the one at position i
                wrong.setdefault(letter, set()).add(i)
            if mark in (CORRECT, PRESENT):
                seen[letter] = seen.get(letter, 0) + 1
            elif mark == ABSENT:
                marked_absent.add(letter)
        for letter, n in seen.items():
            least[letter] = max(least.get(letter, 0), n)
    yellows = {letter for guess, fb in history for letter, m in zip(guess, fb, strict=True) if m == PRESENT}
    return greens, least, wrong, yellows, marked_absent - set(least)


def feedback_use(guess: str, history: Sequence[tuple[str, Feedback]], earlier: Collection[str]) -> float:
    """One turn's use of earlier feedback, in [0, 1]: the mean of the checks that apply (share of known
    greens kept; share of yellow letters used, enough copies, none at a position known wrong; share of the
    5 letters not known absent). A repeated guess scores 0. A guess consistent with all feedback scores 1."""
    if guess in earlier:
        return 0.0
    greens, least, wrong, yellows, absent = _knowledge(history)
    checks = []
    if greens:
        checks.append(sum(guess[i] == letter for i, letter in greens.items()) / len(greens))
    if yellows:
        placed = [
            sum(1 for i, g in enumerate(guess) if g == letter and i not in wrong[letter]) >= least[letter]
            for letter in yellows
        ]
        checks.append(sum(placed) / len(placed))
    if absent:
        checks.append(sum(g not in absent for g in guess) / len(guess))
    return _mean(checks, 1.0)


def wordle_feedback(prompts, completions, secret, history=None, **_columns) -> list[float]:
    """Mean over the model's turns after the game's first of feedback_use (an unplayable guess: 0). The
    first turn has no feedback to use and is left out. An episode with no later turn gets 1.0 when it won at
    once (nothing to go against) and 0.0 otherwise: credit there would pay an episode for ending early
    (a reply cut off or unplayable on the first turn)."""
    out = []
    for game, first in _episodes(completions, secret, history):
        scores = []
        for k in range(max(first, 1), len(game.turns)):
            turn = game.turns[k]
            earlier = game.turns[:k]
            known = [(t.guess, t.feedback) for t in earlier if t.feedback is not None]
            guesses = {t.guess for t in earlier if t.feedback is not None}
            scores.append(0.0 if turn.feedback is None else feedback_use(turn.guess, known, guesses))
        won = game.solved and len(game.turns) > first
        out.append(_mean(scores, 1.0 if won else 0.0))
    return out


def guess_values(game: WordleGame, first: int = 0, pool: Sequence[str] | None = None) -> list[float]:
    """Information value of each turn from `first` on: the entropy of the guess's feedback over the pool
    words still consistent with earlier feedback, over the best a candidate guess could get (capped at 1).
    One candidate left: 1 for guessing it, else 0. Unplayable guesses: 0."""
    pool = tuple(answers() if pool is None else pool)
    if game.secret not in pool:  # a secret from outside the pool must stay a candidate
        pool += (game.secret,)
    table = pattern_table(pool)
    candidates = np.arange(len(pool))
    values = []
    for k, turn in enumerate(game.turns):
        if k >= first:
            if turn.feedback is None:
                values.append(0.0)
            elif len(candidates) == 1:
                values.append(1.0 if pool[candidates[0]] == turn.guess else 0.0)
            else:
                bits = table.entropy(turn.guess, candidates)
                values.append(bits / max(table.best_entropy(candidates), bits))
        if turn.feedback is not None:
            candidates = table.filter(candidates, turn.guess, turn.feedback)
    return values


def wordle_guess_value(prompts, completions, secret, history=None, **_columns) -> list[float]:
    """Mean over the model's turns of guess_values: how much each guess narrows the possible secrets,
    relative to the best candidate guess (1 = as informative as the best; no turns: 0)."""
    return [_mean(guess_values(game, first), 0.0) for game, first in _episodes(completions, secret, history)]


def wordle_win(prompts, completions, secret, history=None, **_columns) -> list[float]:
    """(7 - k) / 6 when the model's guess solves the game on guess k (unplayable replies count as guesses):
    1.0 on the first, 1/6 on the sixth; 0 when not solved."""
    out = []
    for game, first in _episodes(completions, secret, history):
        won = game.solved and len(game.turns) > first
        out.append((game.max_guesses + 1 - len(game.turns)) / game.max_guesses if won else 0.0)
    return out


def wordle_solved(prompts, completions, secret, history=None, **_columns) -> list[float]:
    """1.0 when one of the model's guesses solves the game, else 0.0: the task's correctness (win rate)."""
    return [
        float(game.solved and len(game.turns) > first)
        for game, first in _episodes(completions, secret, history)
    ]


WORDLE_REWARDS = {
    "wordle_solved": wordle_solved,
    "wordle_format": wordle_format,
    "wordle_feedback": wordle_feedback,
    "wordle_guess_value": wordle_guess_value,
    "wordle_win": wordle_win,
}


@dataclass(frozen=True)
class EpisodeMetrics:
    win: bool
    guesses: int  # turns used, unplayable ones included
    invalid: int  # turns whose reply was not a playable guess
    invalid_rate: float
    format_rate: float  # share of turns with a <guess> tag holding 5 letters a-z (a word or not)
    consistency_rate: float | None  # share of turns after the first whose guess fits all earlier feedback


def episode_metrics(game: WordleGame, first: int = 0) -> EpisodeMetrics:
    """Evaluation numbers for a finished game, over the turns from `first` (the model's) on."""
    turns = game.turns[first:]
    n = len(turns)
    invalid = sum(not t.valid for t in turns)
    later = range(max(first, 1), len(game.turns))
    consistent = [
        game.turns[k].valid
        and is_consistent(game.turns[k].guess, [(t.guess, t.feedback) for t in game.turns[:k] if t.valid])
        for k in later
    ]
    return EpisodeMetrics(
        win=game.solved and len(game.turns) > first,
        guesses=len(game.turns),
        invalid=invalid,
        invalid_rate=invalid / n if n else 0.0,
        format_rate=sum(t.problem in (None, NOT_A_WORD) for t in turns) / n if n else 0.0,
        consistency_rate=sum(consistent) / len(consistent) if consistent else None,
    )


def summarize(metrics: Sequence[EpisodeMetrics]) -> dict[str, float]:
    """Means over episodes: win rate, guesses per win, invalid-guess rate, format and consistency rates."""
    if not metrics:
        return {}
    wins = [m.guesses for m in metrics if m.win]
    rated = [m.consistency_rate for m in metrics if m.consistency_rate is not None]
    return {
        "win_rate": len(wins) / len(metrics),
        "guesses_per_win": sum(wins) / len(wins) if wins else float("nan"),
        "invalid_rate": sum(m.invalid_rate for m in metrics) / len(metrics),
        "format_rate": sum(m.format_rate for m in metrics) / len(metrics),
        "consistency_rate": sum(rated) / len(rated) if rated else float("nan"),
    }
