import pytest

from graft.config import ConfigError
from graft.rewards import last_integer, load_reward
from graft.rewards.builtin import extract_last_integer


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is 42.", 42),
        ("12 + 30 = 42", 42),
        ("x = -7", -7),
        ("1,234 apples", 1234),
        ("42.0", 42),
        ("3.5", None),  # a decimal is not an integer answer, and not '5'
        ("no digits here", None),
        ("", None),
        ("step2 gives", None),  # digits glued to a word are not a number
    ],
)
def test_extract_last_integer(text, value):
    assert extract_last_integer(text) == value


def test_last_integer_reward_right_wrong_malformed_empty():
    completions = ["7 + 5 = 12", "It is 13.", "twelve", "", "12.5", "The answer is 12\n"]
    assert last_integer(None, completions, answer=["12"] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_negative_answers():
    assert last_integer(None, ["3 - 8 = -5", "3 - 8 = 5"], answer=["-5", "-5"]) == [1.0, 0.0]


def test_unknown_reward_name_lists_the_builtins():
    with pytest.raises(ConfigError, match="reward 'correctness' is not built in"):
        load_reward("correctness")
