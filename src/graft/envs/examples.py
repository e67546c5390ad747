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
