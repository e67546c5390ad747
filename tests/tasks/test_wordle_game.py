import pytest

from graft.tasks.wordle.data.make_lists import EXCLUDED_ANSWERS
from graft.tasks.wordle.game import (
    ABSENT,
    BAD_LENGTH,
    CORRECT,
    NO_TAG,
    NOT_A_WORD,
    NOT_LETTERS,
    PRESENT,
    WordleGame,
    check_guess,
    consistent_candidates,
    guess_problem,
    instructions,
    is_consistent,
    parse_guess,
    render_feedback,
    score_guess,
)
from graft.tasks.wordle.words import DATA_DIR, answers, valid_guesses

C, P, A = CORRECT, PRESENT, ABSENT


@pytest.mark.parametrize(
    ("secret", "guess", "want"),
    [
        # greens b(2) e(3); left in the secret: a b y, so the guess's b(0) and a(1) are yellow, s absent
        ("abbey", "babes", (P, P, C, C, A)),
        # green e(4); left: c r a n. Neither earlier e has a copy left, r is yellow
        ("crane", "eerie", (A, A, P, A, C)),
        # no greens; left: s p e e d. Both e are yellow (two copies), s yellow, r a absent
        ("speed", "erase", (P, A, A, P, P)),
        # one e in the secret: the first e takes it, the second is absent
        ("abide", "speed", (A, A, P, A, P)),
        # the secret's only e is used by the green at 4: the other two e are absent
        ("those", "geese", (A, A, A, C, C)),
        # green e(1); left: l v e r. e(0) takes the last e, so e(4) is absent
        ("lever", "eerie", (P, C, P, A, A)),
        ("crane", "crane", (C,) * 5),
        ("crane", "fuzzy", (A,) * 5),
    ],
)
def test_score_guess_duplicate_letter_rule(secret, guess, want):
    assert score_guess(secret, guess) == want


def test_score_guess_rejects_a_length_mismatch():
    with pytest.raises(ValueError):
        score_guess("crane", "cranes")


def test_render_feedback_default_and_custom_symbols():
    fb = score_guess("caste", "crane")
    assert render_feedback("crane", fb) == "C ✔ R ❌ A - N ❌ E ✔"
    assert render_feedback("crane", fb, {C: "G", P: "Y", A: "."}) == "C G R . A Y N . E G"


def test_parse_guess_takes_the_last_tag_lowercased():
    assert parse_guess("maybe <guess>slate</guess>, no: <guess> CRANE </guess>") == "crane"
    assert parse_guess("<GUESS>Trace</GUESS>") == "trace"
    assert parse_guess("<guess>\nbrick\n</guess>") == "brick"
    assert parse_guess("crane") is None
    assert parse_guess("<guess>crane") is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("<guess>crane</guess>", None),
        ("crane", NO_TAG),
        ("<guess>cranes</guess>", BAD_LENGTH),
        ("<guess></guess>", BAD_LENGTH),
        ("<guess>cr4ne</guess>", NOT_LETTERS),
        ("<guess>c-r-a</guess>", NOT_LETTERS),
        ("<guess>xyzzy</guess>", NOT_A_WORD),
    ],
)
def test_guess_problem_says_why(text, why):
    assert guess_problem(text) == why


def test_check_guess_with_an_own_word_list():
    assert check_guess("xyzzy", {"xyzzy"}) is None
    assert check_guess("crane", {"xyzzy"}) == NOT_A_WORD


def test_consistent_candidates_by_hand():
    # crane vs caste: C ✔ R ❌ A - N ❌ E ✔ -> c first, e last, an a not in the middle, no r, no n.
    history = [("crane", score_guess("caste", "crane"))]
    words = ["caste", "paste", "cadet", "chase", "cache"]
    # paste: no c first; cadet: no e last; chase: its a sits where the a is known not to be
    assert consistent_candidates(history, words) == ["caste", "cache"]
    assert is_consistent("cache", history) and not is_consistent("chase", history)
    assert consistent_candidates([], words) == words


def test_game_flow_invalid_replies_cost_a_guess():
    game = WordleGame("crane")
    assert game.step("I think <guess>slate</guess>") == "S ❌ L ❌ A ✔ T ❌ E ✔\n5 guesses left."
    assert game.step("<guess>xyzzy</guess>") == "Invalid guess (not in the word list).\n4 guesses left."
    assert game.step("no tag") == "Invalid guess (no <guess> tag).\n3 guesses left."
    assert game.step("<guess>Crane</guess>") == "C ✔ R ✔ A ✔ N ✔ E ✔\nSolved in 4 guesses!"
    assert game.solved and game.over and game.guesses_left == 2
    assert [t.guess for t in game.turns] == ["slate", "xyzzy", None, "crane"]
    assert game.history == [("slate", score_guess("crane", "slate")), ("crane", (C,) * 5)]
    with pytest.raises(RuntimeError):
        game.play("trace")


def test_game_is_lost_after_six_guesses():
    game = WordleGame("crane")
    for word in ["slate", "brick", "fuzzy", "mound"]:
        game.play(word)
    assert game.step("<guess>pygmy</guess>").endswith("\n1 guess left.")
    last = game.step("<guess>whiff</guess>")
    assert last.endswith("No guesses left. The word was CRANE.")
    assert game.over and not game.solved and game.guesses_left == 0


def test_instructions_are_short_and_explain_the_format():
    text = instructions()
    assert "<guess>" in text and "✔" in text and "❌" in text and "6 guesses" in text
    assert "C ✔ R ❌ A - N ❌ E ✔" in text  # the worked example is scored for real
    # prompt + six turns of replies and feedback stay small: under ~1k tokens for a 135M model's context
    game, shown = WordleGame("crane"), [text]
    for word in ["slate", "brick", "fuzzy", "mound", "pygmy", "whiff"]:
        reply = f"<guess>{word}</guess>"
        shown += [reply, game.step(reply)]
    assert len("\n".join(shown)) < 1500


def test_word_lists_shipped_and_clean():
    pool, guesses = answers(), valid_guesses()
    assert 1500 <= len(pool) <= 2500 and 5000 <= len(guesses) <= 13000
    assert set(pool) <= guesses
    assert list(pool) == sorted(set(pool))
    assert all(len(w) == 5 and w.isascii() and w.isalpha() and w.islower() for w in guesses)
    assert not EXCLUDED_ANSWERS & set(pool)
    assert {"crane", "slate", "those"} <= set(pool) and "boxes" not in pool and "boxes" in guesses
    for name in ("LICENSE-SCOWL.txt", "NOTICE.md"):
        assert "Kevin Atkinson" in (DATA_DIR / name).read_text(encoding="utf-8")
