"""Wordle as an environment, on the game core of graft.tasks.wordle: the first user message is the rules,
each reply is played as a guess and answered with its feedback line, and the game ends when solved or out
of guesses. Rewards (graft.tasks.wordle.rewards) replay the game from the `secret` column and the model's
reply texts, so they need nothing from here; `info` carries the state for logging and metrics."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from graft.envs.base import Environment, StepResult
from graft.tasks.wordle.game import (
    DEFAULT_SYMBOLS,
    MAX_GUESSES,
    WordleGame,
    instructions,
    parse_guess,
    render_feedback,
)
from graft.tasks.wordle.game import observation as feedback_text


class WordleEnv(Environment):
    """One game per episode. The row gives `secret` and optionally `history`: guesses already played before
    the model's first turn (mid-game starts), shown in the first message, as the rewards' `history` column."""

    def __init__(
        self,
        max_guesses: int = MAX_GUESSES,
        words: Collection[str] | None = None,
        symbols: Mapping[str, str] = DEFAULT_SYMBOLS,
    ):
        self.max_guesses, self.words, self.symbols = max_guesses, words, symbols
        self.game: WordleGame | None = None
        self.first = 0  # index of the model's first turn in game.turns

    def reset(self, row: dict) -> str:
        secret = row.get("secret")
        if not isinstance(secret, str) or not secret.strip():
            raise ValueError(f"a wordle row needs a 'secret' word, got {secret!r}")
        self.game = WordleGame(secret.strip().lower(), max_guesses=self.max_guesses, words=self.words)
        for guess in row.get("history") or ():
            self.game.play(guess)
        if self.game.over:
            raise ValueError(f"the row's history already ends the game: {list(row.get('history'))}")
        self.first = len(self.game.turns)
        text = instructions(self.symbols, self.max_guesses)
        played = [render_feedback(t.guess, t.feedback, self.symbols) for t in self.game.turns if t.valid]
        if played:
            left = self.game.guesses_left
            text += (
                "\nGuesses so far:\n" + "\n".join(played) + f"\n{left} guess{'es' if left > 1 else ''} left."
            )
        return text

    def step(self, reply: str) -> StepResult:
        if self.game is None:
            raise RuntimeError("step before reset")
        turn = self.game.play(parse_guess(reply), reply)
        return StepResult(feedback_text(self.game, turn, self.symbols), done=self.game.over, info=self.info())

    @staticmethod
    def summarize(episodes) -> dict[str, float]:
        """Evaluation measures over finished episodes (graft.training.episodes.evaluate_episodes): win rate,
        guesses per win, invalid-guess, format and feedback-consistency rates, each game replayed from its
        secret and the model's replies."""
        from graft.tasks.wordle.rewards import episode_metrics, replay, summarize

        games = [replay(e.row["secret"], e.replies, e.row.get("history") or ()) for e in episodes]
        return summarize([episode_metrics(game, first) for game, first in games])

    def info(self) -> dict:
        """The game so far as plain data (JSON-able): enough to rebuild it or compute episode metrics."""
        game = self.game
        return {
            "secret": game.secret,
            "solved": game.solved,
            "over": game.over,
            "first": self.first,
            "guesses": [t.guess for t in game.turns],
            "problems": [t.problem for t in game.turns],
            "invalid": sum(not t.valid for t in game.turns[self.first :]),
        }
