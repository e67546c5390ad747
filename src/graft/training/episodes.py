"""Steps 1 and 2 of a GRPO step for a multi-turn task: G episodes per problem played against the task's
environment (graft.rollout.episodes: the model's ids as sampled, the environment's tokenized once), then
each episode scored as a whole by the reward functions, which see its messages."""

from __future__ import annotations

import torch

from graft.batch import ScoredBatch
from graft.evaluation.core import EvalResult
from graft.evaluation.metrics import percentile
from graft.models import merged_adapter
from graft.rollout.episodes import EpisodeBatch, sample_episodes
from graft.tasks import Problem
from graft.training.records import PhaseTimer
from graft.training.scoring import score_completions
from graft.training.setup import StepSetup


def play_episodes(
    setup: StepSetup,
    problems: list[Problem],
    group_size: int,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> EpisodeBatch:
    """`group_size` episodes of each problem with the policy as it is now (no dropout, LoRA merged), drawn
    with `generator` (default: the rollouts' own, which the checkpoints keep)."""
    cfg = setup.cfg
    setup.policy.eval()
    engine = setup.backend if setup.backend.name != "graft" else None  # vLLM: its own copy of the weights
    with merged_adapter(setup.policy, cfg.generation.merge_adapter and engine is None) as model:
        return sample_episodes(
            model,
            setup.tokenizer,
            problems,
            group_size=group_size,
            env_factory=setup.environment,
            max_new_tokens=cfg.generation.max_new_tokens,
            max_turns=cfg.episode.max_turns,
            max_episode_tokens=cfg.episode.max_episode_tokens,
            stop_ids=setup.stop_ids,
            temperature=cfg.generation.temperature,
            top_p=cfg.generation.top_p,
            greedy=greedy,
            generator=generator or setup.generator,
            system_prompt=setup.task.system_prompt,  # None: the environment's own
            env_timeout=cfg.episode.env_timeout,
            engine=engine,
        )


def score_episodes(
    setup: StepSetup, problems: list[Problem], played: EpisodeBatch
) -> tuple[list, torch.Tensor, dict]:
    """(each episode's messages after the prompt, total (B,), per-function (B,) each). The functions get the
    episode as chat messages (the model's turns and the environment's) plus the problem's columns."""
    completions, prompts, columns = episode_reward_inputs(setup, problems, played)
    total, per_fn = score_completions(setup.rewards, setup.reward_weights, prompts, completions, columns)
    if setup.correctness_name not in per_fn:
        per_fn[setup.correctness_name] = torch.tensor(setup.correctness(prompts, completions, **columns))
    return completions, total, per_fn


def episode_reward_inputs(
    setup: StepSetup, problems: list[Problem], played: EpisodeBatch
) -> tuple[list[list[dict]], list, dict[str, list]]:
    """(each episode's messages after the prompt, prompts, columns) for the reward functions, one per
    episode: the problem's columns plus the episode's token ids and its length limit."""
    group_size = played.rollout.group_size
    completions = [episode.completion_messages() for episode in played.episodes]
    prompts, columns = setup.task.reward_inputs([p for p in problems for _ in range(group_size)])
    columns["completion_ids"] = [episode.completion_ids() for episode in played.episodes]
    columns["max_completion_length"] = [setup.cfg.episode.max_episode_tokens] * len(completions)
    return completions, prompts, columns


def transcript(messages: list[dict]) -> str:
    """An episode as one text for the completions log: each turn on its own lines, marked by its role."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def play_and_score(setup: StepSetup, problems: list[Problem], timer: PhaseTimer) -> ScoredBatch:
    """The episodes of `problems`, scored. An episode the environment broke (raised, hung, returned garbage)
    gets no reward, so it stays out of its group's baseline, and no loss; so does one a limit cut short,
    with episode.drop_truncated. Their counts go in the step's metrics."""
    with timer.phase("rollout"):
        played = play_episodes(setup, problems, setup.cfg.grpo.num_generations)
    with timer.phase("reward"):
        completions, total, per_fn = score_episodes(setup, problems, played)
    left_out = played.failed.clone()
    if setup.cfg.episode.drop_truncated:
        left_out |= played.rollout.truncated.cpu()
    total = torch.where(left_out, torch.nan, total)
    batch = ScoredBatch(
        played.rollout,
        total,
        torch.zeros_like(total),
        None,
        None,
        [transcript(c) for c in completions],
        per_fn,
        problems,
        loss_rows=~left_out if bool(left_out.any()) else None,
    )
    batch.metrics = {**played.metrics(), "episodes/left_out": float(left_out.float().mean())}
    return batch


def evaluate_episodes(
    setup: StepSetup, num_problems: int | None, batch_size: int, generator: torch.Generator
) -> EvalResult:
    """Greedy episodes on the held-out problems: accuracy (the correctness reward, e.g. the win rate),
    episode lengths and truncation, what the environment measures itself (Environment.summarize: Wordle's
    invalid-guess, format and feedback-consistency rates) and the first few games turn by turn."""
    problems = setup.task.eval[:num_problems]
    episodes = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        episodes += play_episodes(setup, chunk, 1, greedy=True, generator=generator).episodes
    completions = [episode.completion_messages() for episode in episodes]
    prompts, columns = setup.task.reward_inputs(problems)
    scores = setup.correctness(prompts, completions, **columns)
    lengths = [len(episode.completion_ids()) for episode in episodes]
    summarize = getattr(setup.environment, "summarize", None)
    # NaN (no win to count guesses of): left out, so the report shows no row rather than "nan"
    measured = {k: v for k, v in (summarize(episodes) if summarize else {}).items() if v == v}
    return EvalResult(
        accuracy=sum(s >= 1.0 for s in scores) / max(len(scores), 1),
        num_problems=len(problems),
        mean_length=sum(lengths) / max(len(lengths), 1),
        truncated_fraction=sum(e.truncated is not None for e in episodes) / max(len(episodes), 1),
        p95_length=percentile(lengths, 95),
        format_compliance=measured.get("format_rate"),
        samples=[
            {"prompt": e.first_message, "completion": transcript(c), "score": s}
            for e, c, s in list(zip(episodes, completions, scores, strict=True))[:4]
        ],
        episode={k: v for k, v in measured.items() if k != "format_rate"},
    )
