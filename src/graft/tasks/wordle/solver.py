"""Fast feedback patterns (numpy), the information a guess gives, and a candidate-filtering solver that
plays whole games: the demonstrations for multi-turn SFT warm-up, and the yardstick of the info reward."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from graft.tasks.wordle.game import ABSENT, CORRECT, MAX_GUESSES, PRESENT, Feedback, score_guess
from graft.tasks.wordle.words import WORD_LENGTH, answers

N_PATTERNS = 3**WORD_LENGTH  # 243 possible feedbacks
_MARK_VALUE = {ABSENT: 0, PRESENT: 1, CORRECT: 2}
_POWERS = 3 ** np.arange(WORD_LENGTH)
# The max-entropy opener over the shipped answer pool (5.90 bits; of every valid guess too), fixed so that no
# game pays for scanning all openers.
FIRST_GUESS = "slate"
# Beyond this many candidates the best guess is looked for among an even sample of them: same choice in
# practice, bounded time.
MAX_SCAN = 400


def encode(words: Sequence[str]) -> np.ndarray:
    """(n, 5) uint8 letter codes."""
    joined = "".join(words).encode("ascii")
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(words), WORD_LENGTH).copy()


def feedback_code(feedback: Feedback) -> int:
    """A feedback as one number in [0, 243): absent 0, present 1, correct 2, position i weighing 3**i."""
    return sum(_MARK_VALUE[m] * 3**i for i, m in enumerate(feedback))


def pattern_matrix(guesses: np.ndarray, secrets: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(len(guesses), len(secrets)) feedback codes, the same rule as game.score_guess: a yellow at position
    i only while the secret's non-green copies of that letter outnumber the guess's earlier non-green ones."""
    out = np.empty((len(guesses), len(secrets)), dtype=np.uint8)
    for start in range(0, len(guesses), chunk):
        g = guesses[start : start + chunk, None, :]  # (m, 1, 5)
        s = secrets[None, :, :]  # (1, n, 5)
        green = g == s  # (m, n, 5)
        open_secret = np.where(green, 0, s)  # letter codes are >= 97, so 0 never matches
        code = np.zeros(green.shape[:2], dtype=np.int32)
        for i in range(WORD_LENGTH):
            letter = g[..., i : i + 1]
            available = (open_secret == letter).sum(-1)
            used_before = ((g[..., :i] == letter) & ~green[..., :i]).sum(-1)
            yellow = ~green[..., i] & (available > used_before)
            code += (2 * green[..., i] + yellow) * _POWERS[i]
        out[start : start + chunk] = code
    return out


def entropies(codes: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row's feedback distribution (rows: guesses, columns: equally likely secrets)."""
    codes = np.atleast_2d(codes)
    rows, n = codes.shape
    if n == 0:
        return np.zeros(rows)
    counts = np.bincount((np.arange(rows)[:, None] * N_PATTERNS + codes).ravel(), minlength=rows * N_PATTERNS)
    p = counts.reshape(rows, N_PATTERNS) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(1)


class PatternTable:
    """Feedback codes between a fixed word pool's words, computed once in full (2k x 2k: ~4 MB, well under a
    second) so that candidate filtering and information values are array lookups."""

    def __init__(self, words: Sequence[str]):
        self.words = tuple(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.letters = encode(self.words)
        self._matrix: np.ndarray | None = None
        self._best: dict[bytes, float] = {}

    @property
    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = pattern_matrix(self.letters, self.letters)
        return self._matrix

    def row(self, guess: str, candidates: np.ndarray) -> np.ndarray:
        """Codes of `guess` against the pool words at `candidates` (any valid guess, in the pool or not)."""
        i = self.index.get(guess)
        if i is not None:
            return self.matrix[i, candidates]
        return pattern_matrix(encode([guess]), self.letters[candidates])[0]

    def filter(self, candidates: np.ndarray, guess: str, feedback: Feedback) -> np.ndarray:
        """The candidates that would have produced `feedback` for `guess`."""
        return candidates[self.row(guess, candidates) == feedback_code(feedback)]

    def entropy(self, guess: str, candidates: np.ndarray) -> float:
        return float(entropies(self.row(guess, candidates))[0])

    def scan(self, candidates: np.ndarray) -> np.ndarray:
        """Guesses worth comparing: the candidates themselves, an even sample when there are many."""
        if len(candidates) <= MAX_SCAN or len(candidates) == len(self.words):  # the full pool: once, cached
            return candidates
        return candidates[np.linspace(0, len(candidates) - 1, MAX_SCAN).astype(int)]

    def best_entropy(self, candidates: np.ndarray) -> float:
        """The most bits any scanned candidate guess gives; cached, since every episode starts from the same
        full pool and many share their first feedback."""
        key = candidates.tobytes()
        if key not in self._best:
            refs = self.scan(candidates)
            self._best[key] = float(entropies(self.matrix[np.ix_(refs, candidates)]).max())
            if len(self._best) > 50_000:  # bounded: a long run sees many candidate sets
                self._best.clear()
        return self._best[key]


def pattern_table(words: Sequence[str] | None = None) -> PatternTable:
    """The shared table for a pool (None: the shipped answer pool), built once per process."""
    return _table(answers() if words is None else tuple(words))


@lru_cache(maxsize=4)
def _table(words: tuple[str, ...]) -> PatternTable:
    return PatternTable(words)


def solve(
    secret: str,
    words: Sequence[str] | None = None,
    rng: random.Random | None = None,
    *,
    strategy: str = "entropy",
    first_guess: str | None = FIRST_GUESS,
    max_guesses: int = MAX_GUESSES,
) -> list[str]:
    """The guesses of a game against `secret`, every one a word still consistent with all feedback so far
    (so each is a clean demonstration of using feedback). `words`: the candidate pool (None: the answer
    pool; the secret is added if missing). strategy 'entropy' takes the max-information candidate, ties
    broken by `rng`; 'random' takes any candidate, for varied games. Deterministic for a seeded rng."""
    rng = rng or random.Random(0)
    pool = tuple(answers() if words is None else words)
    if secret not in pool:
        pool += (secret,)
    table = pattern_table(pool)
    candidates = np.arange(len(pool))
    guesses: list[str] = []
    while len(guesses) < max_guesses:
        if not guesses and first_guess is not None:
            guess = first_guess
        elif strategy == "random" or len(candidates) <= 2:
            guess = pool[candidates[rng.randrange(len(candidates))]]
        elif strategy == "entropy":
            refs = table.scan(candidates)
            scores = entropies(table.matrix[np.ix_(refs, candidates)])
            best = np.flatnonzero(scores >= scores.max() - 1e-9)
            guess = pool[refs[best[rng.randrange(len(best))]]]
        else:
            raise ValueError(f"unknown strategy {strategy!r}: entropy or random")
        guesses.append(guess)
        if guess == secret:
            break
        candidates = table.filter(candidates, guess, score_guess(secret, guess))
    return guesses
