"""The wordle task: one game per row, its secret drawn from the shipped answer pool; the held-out games
use secrets never trained on. The episodes are played by graft.envs.wordle.WordleEnv."""

from __future__ import annotations

import random

from graft.config import TaskConfig
from graft.tasks.base import Problem, Task
from graft.tasks.wordle.words import answers

# wordle_solved first: the correctness reward (accuracy = win rate); the others shape the play
DEFAULT_REWARDS = ("wordle_solved", "wordle_format", "wordle_feedback", "wordle_guess_value")


def wordle_task(cfg: TaskConfig) -> Task:
    pool = list(answers())
    random.Random(cfg.seed).shuffle(pool)
    num_eval = min(cfg.num_eval, len(pool) // 4)
    held_out, rest = pool[:num_eval], pool[num_eval:]
    train = rest[: cfg.num_train]

    def game(secret: str) -> Problem:  # the environment writes the first message from the secret
        return Problem(prompt=f"Wordle game (secret: {secret})", answer=secret, columns={"secret": secret})

    return Task(
        name="wordle",
        train=[game(s) for s in train],
        eval=[game(s) for s in held_out],
        system_prompt=None,  # the environment's own
        default_rewards=DEFAULT_REWARDS,
        episode_demonstrations=lambda: solver_turns(train, cfg.seed),
    )


def solver_turns(secrets: list[str], seed: int) -> list[tuple[list[dict[str, str]], str]]:
    """SFT warm-up data: the solver's games (every guess fits all earlier feedback), played through the
    environment so the messages are exactly those of a GRPO episode; one example per game (the
    conversation up to the last guess, and that guess: graft.training.sft trains on every guess in it)."""
    from graft.envs.wordle import WordleEnv
    from graft.tasks.wordle.solver import solve

    rng = random.Random(seed)
    examples = []
    for secret in secrets:
        env = WordleEnv()
        messages = [{"role": "user", "content": env.reset({"secret": secret})}]
        for guess in solve(secret, rng=rng):
            reply = f"<guess>{guess}</guess>"
            result = env.step(reply)
            if result.done:
                examples.append((messages, reply))
                break
            messages = [
                *messages,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": result.observation},
            ]
    return examples
