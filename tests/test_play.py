"""graft play: a person against the Wordle environment, and a model's game shown turn by turn."""

import io

from graft.cli import main


def test_a_person_plays_wordle_with_bare_words(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("crane\ngrate\n"))
    assert main(["play", "--human", "--secret", "grate"]) == 0
    out = capsys.readouterr().out
    # crane against grate: r a e in place, c n absent; then grate solves it
    assert "C ❌ R ✔ A ✔ N ❌ E ✔" in out and "game over: solved (secret: grate)" in out


def test_a_model_plays_a_game_turn_by_turn(tiny_model_dir, capsys):
    args = ["play", f"model.name={tiny_model_dir}", "task.name=wordle", "generation.max_new_tokens=4",
            "episode.max_turns=2", "--secret", "grate"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plays (secret: grate)" in out and "turn 1" in out and "episode ended" in out
