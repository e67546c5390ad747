"""load_environment: built-in names, files and modules, and an error that says what is wrong for each way
a spec can name nothing usable."""

from __future__ import annotations

import pytest

from graft.config import ConfigError
from graft.envs import BUILTIN_ENVIRONMENTS, Environment, EnvironmentSpecError, load_environment
from graft.envs.examples import GuessNumber
from graft.envs.wordle import WordleEnv

GOOD = """
from graft.envs import Environment, StepResult

class Echo(Environment):
    def reset(self, row):
        return "say something"

    def step(self, reply):
        return StepResult(reply, done=True)

def helper():
    return 1

class NotAnEnv:
    pass
"""


def test_builtin_names_and_modules():
    assert load_environment("wordle") is WordleEnv
    assert load_environment("guess_number") is GuessNumber
    assert load_environment("graft.envs.wordle:WordleEnv") is WordleEnv
    assert set(BUILTIN_ENVIRONMENTS) == {"wordle", "guess_number"}
    assert issubclass(EnvironmentSpecError, ConfigError)  # the CLI reports it as a config problem


def test_a_file_with_a_class(tmp_path):
    path = tmp_path / "envs.py"
    path.write_text(GOOD)
    cls = load_environment(f"{path}:Echo")
    assert issubclass(cls, Environment) and cls().step("hi").observation == "hi"
    assert load_environment(str(path)) is cls  # one Environment subclass: the class may be left out


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{dir}/missing.py:Echo", "file not found"),
        ("{dir}/envs.py:Nope", "no 'Nope' in .*it defines: Echo"),
        ("{dir}/envs.py:helper", "helper is function, not a subclass of graft.envs.Environment"),
        ("{dir}/envs.py:NotAnEnv", "NotAnEnv is a class, not a subclass of graft.envs.Environment"),
        ("{dir}/broken.py:Echo", "importing .*broken.py failed: ZeroDivisionError"),
        ("{dir}/empty.py", "name the class .*it defines no Environment subclass"),
        ("no_such_module_xyz:Env", "no module named 'no_such_module_xyz'"),
        ("graft.envs.wordle:Nope", "no 'Nope' in graft.envs.wordle; it defines: WordleEnv"),
        ("tictactoe", "unknown environment 'tictactoe': expected a built-in name \\(guess_number, wordle\\)"),
        ("", "expected a built-in name"),
    ],
)
def test_errors_say_what_is_wrong(tmp_path, spec, message):
    (tmp_path / "envs.py").write_text(GOOD)
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(EnvironmentSpecError, match=message):
        load_environment(spec.format(dir=tmp_path))
