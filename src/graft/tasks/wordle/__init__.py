"""Wordle: the game core (scoring, parsing, prompts), the shipped word lists, a solver, and rewards, for
multi-turn GRPO. Pure Python plus numpy; no model here."""

from graft.tasks.wordle.game import (
    ABSENT,
    CORRECT,
    DEFAULT_SYMBOLS,
    MAX_GUESSES,
    PRESENT,
    Turn,
    WordleGame,
    check_guess,
    consistent_candidates,
    guess_problem,
    instructions,
    is_consistent,
    observation,
    parse_guess,
    render_feedback,
    score_guess,
)
from graft.tasks.wordle.words import answers, is_valid_guess, valid_guesses

__all__ = [
    "ABSENT",
    "CORRECT",
    "DEFAULT_SYMBOLS",
    "MAX_GUESSES",
    "PRESENT",
    "Turn",
    "WordleGame",
    "answers",
    "check_guess",
    "consistent_candidates",
    "guess_problem",
    "instructions",
    "is_consistent",
    "is_valid_guess",
    "observation",
    "parse_guess",
    "render_feedback",
    "score_guess",
    "valid_guesses",
]
