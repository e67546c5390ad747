import math
import random

import numpy as np
import pytest

from graft.tasks.wordle.game import is_consistent, score_guess
from graft.tasks.wordle.solver import (
    FIRST_GUESS,
    encode,
    entropies,
    feedback_code,
    pattern_matrix,
    pattern_table,
    solve,
)
from graft.tasks.wordle.words import answers, valid_guesses

TRICKY = ["abbey", "babes", "crane", "eerie", "speed", "erase", "abide", "those", "geese", "lever", "llama"]


def test_pattern_matrix_matches_score_guess():
    rng = random.Random(0)
    words = TRICKY + rng.sample(sorted(valid_guesses()), 150)
    codes = pattern_matrix(encode(words), encode(words), chunk=64)  # small chunks: the seams are covered
    for i, guess in enumerate(words):
        for j, secret in enumerate(words):
            assert codes[i, j] == feedback_code(score_guess(secret, guess)), (secret, guess)


def test_feedback_code_and_entropies_by_hand():
    assert feedback_code(("absent",) * 5) == 0 and feedback_code(("correct",) * 5) == 242
    assert feedback_code(("present", "correct", "absent", "absent", "absent")) == 1 + 2 * 3
    # rows: 2 patterns of 2 secrets each (1 bit), 4 distinct (2 bits), one pattern (0 bits)
    bits = entropies(np.array([[0, 0, 7, 7], [0, 1, 2, 3], [5, 5, 5, 5]]))
    assert bits == pytest.approx([1.0, 2.0, 0.0])
    # 1 of 3 vs 2 of 3: -(1/3 log2 1/3 + 2/3 log2 2/3)
    assert entropies(np.array([9, 4, 4]))[0] == pytest.approx(math.log2(3) - 2 / 3)


def test_first_guess_is_the_best_opener_of_the_pool():
    table = pattern_table()
    bits = entropies(table.matrix)
    assert FIRST_GUESS in answers()
    assert bits[table.index[FIRST_GUESS]] == pytest.approx(bits.max())
    assert table.best_entropy(np.arange(len(answers()))) == pytest.approx(bits.max())


def test_solver_wins_a_sample_within_six_with_consistent_guesses():
    sample = random.Random(1).sample(answers(), 50)
    for secret in sample:
        guesses = solve(secret, rng=random.Random(0))
        assert guesses[-1] == secret and len(guesses) <= 6, (secret, guesses)
        assert guesses[0] == FIRST_GUESS
        for k, guess in enumerate(guesses):
            history = [(g, score_guess(secret, g)) for g in guesses[:k]]
            assert is_consistent(guess, history), (secret, guesses)


def test_solver_win_rate_over_the_whole_pool():
    # Measured: 1992 of 1996 (99.8%), losses in *ound / *aste / *oker families where six candidates
    # differ by one letter and a consistent guess can rule out only one at a time.
    won = [solve(s, rng=random.Random(0))[-1] == s for s in answers()]
    assert sum(won) / len(won) >= 0.99


def test_solver_is_deterministic_for_a_seed():
    for strategy in ("entropy", "random"):
        a = [solve(s, rng=random.Random(7), strategy=strategy) for s in answers()[:40]]
        b = [solve(s, rng=random.Random(7), strategy=strategy) for s in answers()[:40]]
        assert a == b
    varied = {
        tuple(solve("crane", rng=random.Random(i), strategy="random", first_guess=None)) for i in range(8)
    }
    assert len(varied) > 1


def test_solver_on_an_own_word_list():
    words = ["crane", "crate", "grate", "slate"]
    assert solve("grate", words, first_guess=None)[-1] == "grate"
    assert solve("zonal", words, first_guess="crane")[-1] == "zonal"  # a secret outside the list is added
    with pytest.raises(ValueError):
        solve("crane", words, strategy="greedy", first_guess=None)
