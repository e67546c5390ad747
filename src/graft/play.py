"""`graft play`: watch a model play a multi-turn task's environment (Wordle by default) turn by turn, or
play the environment yourself (--human) to check its rules."""

from __future__ import annotations

import argparse
import random
import sys

from rich.console import Console
from rich.markup import escape


def cmd_play(args: argparse.Namespace, console: Console) -> int:
    from graft.envs.loading import load_environment
    from graft.tasks import environment_spec
    from graft.tasks.wordle.words import answers

    secret = args.secret or random.Random(args.seed).choice(answers())
    if args.human:
        return play_human(load_environment("wordle"), {"secret": secret}, console)
    from graft.commands import _target
    from graft.inference import load_target
    from graft.models import stop_token_ids
    from graft.rollout.episodes import sample_episodes
    from graft.tasks import system_prompt

    target = _target(args)
    cfg = target.cfg
    env = load_environment(environment_spec(cfg.task) or "wordle")
    model, tokenizer = load_target(target)
    import torch

    played = sample_episodes(
        model, tokenizer, [{"secret": secret, "answer": secret}], group_size=1, env_factory=env,
        max_new_tokens=cfg.generation.max_new_tokens, max_turns=cfg.episode.max_turns,
        stop_ids=stop_token_ids(model, tokenizer), greedy=args.temperature == 0,
        temperature=args.temperature or 1.0, generator=torch.Generator().manual_seed(args.seed),
        system_prompt=system_prompt(cfg.task), env_timeout=cfg.episode.env_timeout,
    )  # fmt: skip
    (episode,) = played.episodes
    console.print(
        f"[bold]{escape(target.label)}[/bold] plays (secret: {secret})\n[dim]{escape(episode.first_message or '')}[/dim]"
    )
    for k, reply in enumerate(episode.replies):
        console.print(f"[bold]turn {k + 1}[/bold] model: {escape(reply)}")
        if k < len(episode.observations) and episode.observations[k]:
            console.print(f"        environment: {escape(episode.observations[k])}")
    end = (
        "failed: " + episode.failure.reason
        if episode.failure
        else episode.truncated or ("done" if episode.done else "")
    )
    console.print(f"[dim]episode ended: {escape(str(end))}; solved: {episode.info.get('solved')}[/dim]")
    return 0


def play_human(env_class, row: dict, console: Console) -> int:
    """The environment against a person at the keyboard: the same rules and feedback the model gets."""
    env = env_class()
    console.print(escape(env.reset(row)))
    while True:
        console.print("your reply (EOF ends): ", end="")
        line = sys.stdin.readline()
        if not line:
            return 0
        reply = line.strip()
        if "<" not in reply and hasattr(env, "game"):  # a bare word at the keyboard: Wordle's answer tag
            reply = f"<guess>{reply}</guess>"
        result = env.step(reply)
        if result.observation:
            console.print(escape(result.observation))
        if result.done:
            console.print(
                f"game over: {'solved' if result.info.get('solved') else 'not solved'} (secret: {row['secret']})"
            )
            return 0


def register(sub) -> None:
    from graft.commands import add_target_arguments

    play = sub.add_parser(
        "play", help="watch a model or run play Wordle (or its task's environment), turn by turn"
    )
    add_target_arguments(play)
    play.add_argument("--secret", help="the secret word (default: a random answer)")
    play.add_argument("--seed", type=int, default=0, help="picks the random secret and seeds sampling")
    play.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    play.add_argument("--human", action="store_true", help="play it yourself: check the rules and feedback")
    play.set_defaults(func=cmd_play, split_config=True)
