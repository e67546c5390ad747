import math
import random
import time

import pytest

from graft.tasks.wordle.game import WordleGame
from graft.tasks.wordle.rewards import (
    WORDLE_REWARDS,
    episode_metrics,
    guess_values,
    replay,
    summarize,
    turn_texts,
    wordle_feedback,
    wordle_format,
    wordle_guess_value,
    wordle_win,
)
from graft.tasks.wordle.solver import solve
from graft.tasks.wordle.words import answers, valid_guesses


def tags(*words: str) -> list[str]:
    return [f"<guess>{w}</guess>" for w in words]


def one(fn, completion, secret="crane", **columns) -> float:
    """Score a single episode."""
    extra = {k: [v] for k, v in columns.items()}
    return fn([None], [completion], [secret], **extra)[0]


def test_turn_texts_accepts_strings_lists_and_chat_messages():
    assert turn_texts("<guess>crane</guess>") == ["<guess>crane</guess>"]
    assert turn_texts(["a", "b"]) == ["a", "b"]
    chat = [
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "feedback"},
        {"role": "assistant", "content": "b"},
    ]
    assert turn_texts(chat) == ["a", "b"]


def test_replay_drops_turns_after_the_end_and_counts_history():
    game, first = replay("crane", tags("slate", "crane", "trace"))
    assert [t.guess for t in game.turns] == ["slate", "crane"] and first == 0
    game, first = replay("crane", "<guess>crane</guess>", history=["slate"])
    assert first == 1 and game.solved and len(game.turns) == 2


def test_format_partial_credit_by_hand():
    # valid word 1, 5 letters but no word 0.5, wrong length 0.25, no tag 0: (1 + .5 + .25 + 0) / 4
    assert one(wordle_format, [*tags("slate", "xyzzy", "cranes"), "crane"]) == pytest.approx(1.75 / 4)
    assert one(wordle_format, tags("cr4ne")) == 0.25
    assert one(wordle_format, "I guess <guess>Crane</guess>") == 1.0
    # chat form: the assistant turns are (valid, no tag)
    chat = [{"role": "assistant", "content": "<guess>slate</guess>"}, {"role": "assistant", "content": "?"}]
    assert one(wordle_format, chat) == 0.5
    # the junk after a win is never played, so never scored
    assert one(wordle_format, [*tags("crane"), "junk"]) == 1.0


def test_feedback_use_greens_and_absent_letters_by_hand():
    # slate vs crane: S ❌ L ❌ A ✔ T ❌ E ✔ -> greens a@2 e@4, s l t absent.
    # trace: greens kept 2/2 = 1; letters not known absent 4/5 (t) -> (1 + 0.8) / 2 = 0.9
    # then crane fits everything -> 1.0; the first turn is not scored -> (0.9 + 1) / 2
    assert one(wordle_feedback, tags("slate", "trace", "crane")) == pytest.approx(0.95)
    # a repeat scores 0; fuzzy keeps 0/2 greens, uses no absent letter 5/5 -> 0.5; (0 + 0.5) / 2
    assert one(wordle_feedback, tags("slate", "slate", "fuzzy")) == pytest.approx(0.25)
    # an unplayable guess scores 0: (0 + 1) / 2
    assert one(wordle_feedback, [*tags("slate"), "no tag", *tags("crane")]) == pytest.approx(0.5)


def test_feedback_use_yellows_by_hand():
    # react vs crane: R - E - A ✔ C - T ❌ -> green a@2; r not @0, e not @1, c not @3; t absent.
    # cream: a@2 kept? no (e there) 0/1; yellows r@1 e@2 c@0 all moved 3/3; no t 5/5 -> (0 + 1 + 1) / 3
    assert one(wordle_feedback, tags("react", "cream")) == pytest.approx(2 / 3)
    # trace: a kept 1/1; r@1 and e@4 moved but c stays @3 -> 2/3; t used 4/5 -> (1 + 2/3 + 0.8) / 3
    assert one(wordle_feedback, tags("react", "trace")) == pytest.approx((1 + 2 / 3 + 0.8) / 3)
    # the same state given as a history column, the model playing one turn
    assert one(wordle_feedback, "<guess>trace</guess>", history=["react"]) == pytest.approx(
        (1 + 2 / 3 + 0.8) / 3
    )


def test_feedback_neutral_without_a_later_turn():
    assert one(wordle_feedback, tags("crane")) == 1.0  # won at once: nothing to go against
    # one unsolved turn used no feedback: no credit, or ending an episode early would pay
    assert one(wordle_feedback, "<guess>fuzzy</guess>") == 0.0


def test_solver_games_use_feedback_fully():
    for i, secret in enumerate(answers()[:30]):
        guesses = solve(secret, rng=random.Random(i), strategy="random")
        assert one(wordle_feedback, tags(*guesses), secret) == 1.0


def test_guess_values_on_a_tiny_pool_by_hand():
    pool = ("crane", "crate", "grate", "slate")
    # crane splits the four: crane all ✔; crate ✔✔✔❌✔; grate ❌✔✔❌✔; slate ❌❌✔❌✔ -> 2 bits, the best
    # slate: crane ❌❌✔❌✔, crate and grate both ❌❌✔✔✔, slate all ✔ -> 1/4, 2/4, 1/4: 1.5 bits -> 1.5/2
    # after slate (secret grate) crate and grate are left; grate splits them: 1 bit of 1 -> 1.0
    game, _ = replay("grate", tags("slate", "grate"))
    assert guess_values(game, pool=pool) == pytest.approx([0.75, 1.0])
    game, _ = replay("grate", tags("crane"))
    assert guess_values(game, pool=pool) == pytest.approx([1.0])
    # trace, not in the pool, also tells all four apart (t❌r✔a✔c-e✔, t-r✔a✔c-e✔, t-r✔a✔c❌e✔, t-r❌a✔c❌e✔)
    game, _ = replay("grate", tags("trace"))
    assert guess_values(game, pool=pool) == pytest.approx([1.0])
    # secret crane: after slate only crane is left; grate then gives nothing (0), crane is the answer (1);
    # an unplayable turn scores 0
    game, _ = replay("crane", [*tags("slate", "grate", "zzzzz", "crane")])
    assert guess_values(game, pool=pool) == pytest.approx([0.75, 0.0, 0.0, 1.0])
    assert guess_values(game, first=2, pool=pool) == pytest.approx([0.0, 1.0])


def test_guess_value_on_the_real_pool():
    values = wordle_guess_value([None] * 3, [tags("slate"), tags("fuzzy"), "oops"], ["crane"] * 3)
    assert values[0] == pytest.approx(1.0)  # the pool's best opener
    assert 0 < values[1] < 0.5 and values[2] == 0.0


def test_guess_value_is_fast():
    rng, words = random.Random(0), sorted(valid_guesses())
    secrets = [rng.choice(answers()) for _ in range(32)]
    episodes = [tags(*(rng.choice(words) for _ in range(6))) for _ in secrets]
    wordle_guess_value([None] * 32, episodes[:1], secrets[:1])  # builds the shared table once
    start = time.perf_counter()
    wordle_guess_value([None] * 32, episodes, secrets)
    per_turn = (time.perf_counter() - start) / (32 * 6)
    assert per_turn < 0.05, per_turn


def test_win_by_hand():
    assert one(wordle_win, tags("slate", "crane")) == pytest.approx(5 / 6)  # (7 - 2) / 6
    assert one(wordle_win, ["oops", *tags("crane")]) == pytest.approx(5 / 6)  # the invalid reply counted
    assert one(wordle_win, tags("crane")) == 1.0
    assert one(wordle_win, tags("slate", "brick", "fuzzy", "mound", "pygmy", "crane")) == pytest.approx(1 / 6)
    assert one(wordle_win, tags("slate", "brick")) == 0.0
    assert one(wordle_win, "<guess>crane</guess>", history=["slate"]) == pytest.approx(5 / 6)
    assert one(wordle_win, "<guess>crane</guess>", history=["crane"]) == 0.0  # solved before the model


def test_rewards_are_batched_and_in_unit_range():
    rng = random.Random(3)
    secrets = [rng.choice(answers()) for _ in range(6)]
    episodes = [tags(*solve(s, rng=random.Random(i), strategy="random")) for i, s in enumerate(secrets)]
    episodes[0] = ["garbage", "<guess>toolong</guess>"]
    for fn in WORDLE_REWARDS.values():
        values = fn([None] * 6, episodes, secrets, answer=secrets)
        assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values), fn.__name__


def test_episode_metrics_by_hand():
    game = WordleGame("crane")
    for reply in [
        "<guess>slate</guess>",
        "<guess>xyzzy</guess>",
        "<guess>trace</guess>",
        "hm",
        "<guess>crane</guess>",
    ]:
        game.step(reply)
    m = episode_metrics(game)
    assert m.win and m.guesses == 5 and m.invalid == 2 and m.invalid_rate == pytest.approx(0.4)
    assert m.format_rate == pytest.approx(4 / 5)  # xyzzy is well formed, just not a word; "hm" is not
    # after the first: xyzzy unplayable, trace uses the absent t, hm unplayable, crane fits -> 1/4
    assert m.consistency_rate == pytest.approx(0.25)

    lost, _ = replay("crane", tags("slate", "brick", "fuzzy", "mound", "pygmy", "whiff"))
    m2 = episode_metrics(lost)
    assert not m2.win and m2.guesses == 6 and m2.invalid == 0 and m2.format_rate == 1.0
    assert episode_metrics(WordleGame("crane")).consistency_rate is None

    summary = summarize([m, m2])
    assert summary["win_rate"] == 0.5 and summary["guesses_per_win"] == 5
    assert summary["invalid_rate"] == pytest.approx(0.2) and summary["format_rate"] == pytest.approx(0.9)
    assert 0 <= summary["consistency_rate"] <= 1 and summarize([]) == {}
    assert math.isnan(summarize([m2])["guesses_per_win"])
