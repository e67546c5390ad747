"""The Wordle environment end to end: scripted replies through the Environment API, the state in `info`
agreeing with the rewards' replay of the same replies, mid-game starts, bad rows, and episodes with a
model through the sampler."""

from __future__ import annotations

import pytest
import torch

from graft.envs.wordle import WordleEnv
from graft.rollout.episodes import sample_episodes
from graft.tasks.wordle import instructions
from graft.tasks.wordle.rewards import episode_metrics, replay, wordle_format, wordle_win

REPLIES = [
    "I will start wide. <guess>slate</guess>",
    "Hmm, maybe hello",  # no tag: refused, and it still costs a guess
    "<guess>xyzzy</guess>",  # not a word
    "Keep the A and E: <guess>trace</guess>",
    "<guess>CRANE</guess>",
]


def test_a_scripted_game_to_the_win():
    env = WordleEnv()
    assert env.reset({"secret": "crane"}) == instructions()
    results = [env.step(reply) for reply in REPLIES]
    assert [r.done for r in results] == [False, False, False, False, True]
    assert results[0].observation == "S ❌ L ❌ A ✔ T ❌ E ✔\n5 guesses left."
    assert results[1].observation == "Invalid guess (no <guess> tag).\n4 guesses left."
    assert results[2].observation.startswith("Invalid guess (not in the word list).")
    assert results[4].observation == "C ✔ R ✔ A ✔ N ✔ E ✔\nSolved in 5 guesses!"
    info = results[-1].info
    assert info["solved"] and info["over"] and info["invalid"] == 2 and info["first"] == 0
    assert info["guesses"] == ["slate", None, "xyzzy", "trace", "crane"]
    # the rewards replay the same replies from the secret alone and agree with the environment
    game, first = replay("crane", REPLIES)
    assert [t.guess for t in game.turns] == info["guesses"] and game.solved
    assert wordle_win([None], [REPLIES], ["crane"]) == [(7 - 5) / 6]
    assert wordle_format([None], [REPLIES], ["crane"]) == [pytest.approx((1 + 0 + 0.5 + 1 + 1) / 5)]
    assert episode_metrics(env.game, first).invalid == info["invalid"]


def test_out_of_guesses_and_a_mid_game_start():
    env = WordleEnv(max_guesses=3)
    first = env.reset({"secret": "crane", "history": ["slate"]})
    assert "Guesses so far:\nS ❌ L ❌ A ✔ T ❌ E ✔\n2 guesses left." in first
    assert not env.step("<guess>trace</guess>").done
    last = env.step("<guess>caste</guess>")
    assert last.done and not last.info["solved"] and "The word was CRANE." in last.observation
    assert last.info["first"] == 1 and last.info["guesses"] == ["slate", "trace", "caste"]


@pytest.mark.parametrize(
    "row", [{}, {"secret": ""}, {"secret": 5}, {"secret": "crane", "history": ["crane"]}]
)
def test_rows_it_cannot_play_are_refused_at_reset(row):
    with pytest.raises(ValueError):
        WordleEnv().reset(row)


def test_episodes_with_a_model(tiny_tokenizer, tiny_model):
    """A random model never writes a guess: every game runs to its last guess, each one refused. The
    feedback's marks are outside the tiny tokenizer's alphabet, which changes nothing."""
    batch = sample_episodes(
        tiny_model, tiny_tokenizer, [{"secret": "crane"}, {"secret": "slate", "history": ["trace"]}],
        group_size=2, env_factory=lambda: WordleEnv(max_guesses=3), max_new_tokens=3, max_turns=6,
        stop_ids=[tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("a")],
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert not batch.failed.any()
    for ep in batch.episodes:
        if ep.done:  # three model turns, or two after the history's one
            assert ep.num_turns == 3 - ep.info["first"] and not ep.info["solved"]
            assert ep.observations[-1].endswith(f"The word was {ep.row['secret'].upper()}.")
        else:
            assert ep.truncated == "max_new_tokens"
    assert any(ep.done for ep in batch.episodes)
