"""The README's example environment, run as a test. The block between the two marker lines is the code the
README shows, character for character, and it is also src/graft/envs/examples.py (the built-in
"guess_number"), which the first test checks; the tests below import nothing at module level so that the
block stays exactly the README's."""

# --- README example: begin ---
import random
import re

from graft.envs import Environment, StepResult


class GuessNumber(Environment):
    """Higher or lower: find a secret number from 1 to 100 (the row's "secret", else a random one)."""

    system_prompt = "We play a guessing game. Answer with one number."

    def reset(self, row: dict) -> str:
        self.secret = int(row.get("secret") or random.randint(1, 100))
        self.guesses = 0
        return "I am thinking of a number from 1 to 100. Guess it."

    def step(self, reply: str) -> StepResult:
        self.guesses += 1
        numbers = re.findall(r"-?\d+", reply)
        info = {"secret": self.secret, "guesses": self.guesses, "solved": False}
        if not numbers:
            return StepResult("Answer with one number.", info=info)
        guess = int(numbers[-1])
        if guess == self.secret:
            return StepResult(None, done=True, info={**info, "solved": True})
        return StepResult(f"{guess} is wrong. Go {'higher' if guess < self.secret else 'lower'}.", info=info)


# --- README example: end ---


def readme_block() -> str:
    """The code between the markers, without the blank lines around it."""
    from pathlib import Path

    text = Path(__file__).read_text(encoding="utf-8")
    begin, end = "# --- README example: begin ---", "# --- README example: end ---"
    return text.split(begin, 1)[1].split(end, 1)[0].strip() + "\n"


def test_the_readme_block_is_the_shipped_example():
    from pathlib import Path

    import graft.envs.examples

    assert readme_block() == Path(graft.envs.examples.__file__).read_text(encoding="utf-8")


def test_the_readme_shows_this_block():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert "```python\n" + readme_block() + "```" in readme


def test_a_higher_lower_game_through_the_api():
    env = GuessNumber()
    assert "1 to 100" in env.reset({"secret": 42})
    first = env.step("50")
    assert (first.observation, first.done) == ("50 is wrong. Go lower.", False)
    assert env.step("no idea").observation == "Answer with one number."
    assert env.step("Then 17?").observation == "17 is wrong. Go higher."
    last = env.step("It is 42")
    assert last.done and last.info == {"secret": 42, "guesses": 4, "solved": True}
    env.reset({})  # no secret in the row: a random one
    assert 1 <= env.secret <= 100


def test_it_loads_by_name_and_from_a_file(tmp_path):
    from graft.envs import load_environment
    from graft.envs.examples import GuessNumber as Shipped

    assert load_environment("guess_number") is Shipped
    path = tmp_path / "my_env.py"
    path.write_text(readme_block(), encoding="utf-8")
    for spec in (f"{path}:GuessNumber", str(path)):  # the class may be left out: the file has one
        cls = load_environment(spec)
        assert cls.__name__ == "GuessNumber" and cls is not Shipped
        env = cls()
        env.reset({"secret": 3})
        assert env.step("3").done


def test_it_plays_episodes_with_a_model(tiny_tokenizer, tiny_model):
    import torch

    from graft.rollout.episodes import sample_episodes

    rows = [{"secret": 5}, {"secret": 77}]
    batch = sample_episodes(
        tiny_model, tiny_tokenizer, rows, group_size=2, env_factory=GuessNumber, max_new_tokens=4, max_turns=3,
        stop_ids=[tiny_tokenizer.eos_token_id], generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert not batch.failed.any() and batch.rollout.completion_ids.shape[0] == 4
    assert all(e.system_prompt == GuessNumber.system_prompt for e in batch.episodes)
    assert all(e.num_turns >= 1 and (e.done or e.truncated) for e in batch.episodes)
