"""Evaluation on a task split: greedy accuracy (and strict accuracy where the task has a stricter reading),
format compliance, completion lengths and truncation, and from k samples per problem pass@k and maj@k."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from graft.evaluation.metrics import k_values, majority_correct, pass_at_k, percentile
from graft.rewards.builtin import BUILTIN_REWARDS, RewardFn, format_soft
from graft.rollout.sampler import sample
from graft.tasks.answers import answer_block, extract_answer
from graft.tasks.base import Problem, Task


@dataclass
class EvalResult:
    accuracy: float  # greedy: share of problems whose correctness reward is 1
    num_problems: int
    mean_length: float  # greedy completion tokens
    truncated_fraction: float
    p95_length: float = 0.0
    accuracy_strict: float | None = None  # answer in the asked place / form (None: the task has no such)
    format_compliance: float | None = None  # share of greedy completions that give an answer in the format
    num_samples: int = 0  # samples per problem behind pass@k and maj@k (0: greedy only)
    pass_at_k: dict[str, float] = field(default_factory=dict)  # {"1": ..., "4": ...}
    maj_at_k: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # the first greedy completions, with their scores
    episode: dict[str, float] = field(default_factory=dict)  # multi-turn: what the environment measures
    unseen_accuracy: float | None = None  # greedy, the held-out problems in phrasings never trained on
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)  # greedy, per Problem.kind

    def to_dict(self) -> dict:
        return asdict(self)


def encode_prompts(tokenizer, task: Task, problems: list[Problem]) -> list[list[int]]:
    """Prompt token ids through the model's chat template, exactly as in training."""
    return [encode_messages(tokenizer, task.messages(problem)) for problem in problems]


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def decode_completions(tokenizer, token_lists: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(token_lists, skip_special_tokens=True)


def strict_scores(
    task: Task, correctness: RewardFn, prompts, texts: list[str], columns
) -> list[float] | None:
    """Correctness read strictly: only the <answer> block counts in tagged formats; GSM8K needs '#### n'.
    None when the task has one reading only."""
    if task.prompt_format != "plain":
        return correctness(prompts, [answer_block(t) or "" for t in texts], **columns)
    if task.strict_reward:
        return BUILTIN_REWARDS[task.strict_reward](prompts, texts, **columns)
    return None


def format_ok(task: Task, texts: list[str]) -> list[bool]:
    """Tagged formats: the reasoning block then the answer block; plain: some final answer can be read."""
    if task.prompt_format != "plain":
        return [s == 1.0 for s in format_soft([], texts)]
    return [extract_answer(task, t) is not None for t in texts]


def _is_correct(scores) -> list[bool]:
    return [s is not None and s >= 1.0 for s in scores]


def evaluate(
    model,
    tokenizer,
    task: Task,
    correctness: RewardFn,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    num_problems: int | None = None,
    problems: list[Problem] | None = None,
    batch_size: int = 32,
    num_samples_kept: int = 8,
    num_samples: int = 0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> EvalResult:
    """Greedy decoding of every problem (default: the task's held-out split, and its unseen phrasings when it
    has them), then, with num_samples = n > 0, n sampled completions per problem for pass@k and maj@k
    (k = 1, 2, 4, ..., n)."""
    unseen_accuracy = None
    if problems is None:
        problems = task.eval[:num_problems] if num_problems else task.eval
        if task.unseen:
            unseen = task.unseen[:num_problems] if num_problems else task.unseen
            greedy_only = dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids, batch_size=batch_size)
            unseen_accuracy = evaluate(
                model, tokenizer, task, correctness, problems=unseen, num_samples_kept=0, **greedy_only
            ).accuracy
    correct, strict, formatted, lengths, truncated, kept = [], [], [], [], 0, []
    was_training = model.training
    model.eval()
    decode = dict(max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = sample(model, encode_prompts(tokenizer, task, chunk), group_size=1, greedy=True, **decode)
        texts = decode_completions(tokenizer, rollout.completion_token_lists())
        prompts, columns = task.reward_inputs(chunk)
        hits = _is_correct(correctness(prompts, texts, **columns))
        correct += hits
        strict_chunk = strict_scores(task, correctness, prompts, texts, columns)
        if strict_chunk is not None:
            strict += _is_correct(strict_chunk)
        formatted += format_ok(task, texts)
        lengths += rollout.completion_lengths.tolist()
        truncated += int(rollout.truncated.sum())
        for p, text, hit in zip(chunk, texts, hits, strict=True):
            if len(kept) < num_samples_kept:
                kept.append({"prompt": p.prompt, "answer": p.answer, "completion": text, "correct": hit})
    n = len(problems)
    by_kind: dict[str, list[bool]] = {}
    for problem, hit in zip(problems, correct, strict=True):
        if problem.kind is not None:
            by_kind.setdefault(problem.kind, []).append(hit)
    result = EvalResult(
        accuracy=sum(correct) / n,
        num_problems=n,
        mean_length=sum(lengths) / n,
        p95_length=percentile(lengths, 95),
        truncated_fraction=truncated / n,
        accuracy_strict=sum(strict) / n if strict else None,
        format_compliance=sum(formatted) / n,
        samples=kept,
        unseen_accuracy=unseen_accuracy,
        accuracy_by_kind={kind: sum(hits) / len(hits) for kind, hits in sorted(by_kind.items())},
    )
    if num_samples > 0:
        per_chunk = max(1, batch_size // num_samples)
        texts, hits = [], []
        for start in range(0, n, per_chunk):
            chunk = problems[start : start + per_chunk]
            rollout = sample(
                model,
                encode_prompts(tokenizer, task, chunk),
                group_size=num_samples,
                temperature=temperature,
                generator=generator,
                **decode,
            )
            texts += decode_completions(tokenizer, rollout.completion_token_lists())
            prompts, columns = task.reward_inputs([p for p in chunk for _ in range(num_samples)])
            hits += _is_correct(correctness(prompts, texts[-len(prompts) :], **columns))
        result.num_samples = num_samples
        result.pass_at_k, result.maj_at_k = sampled_metrics(task, texts, hits, num_samples)
    model.train(was_training)
    return result


def sampled_metrics(
    task: Task, texts: list[str], hits: list[bool], n: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(pass@k, maj@k) for k = 1, 2, 4, ..., n, averaged over problems. texts and hits hold n samples per
    problem, a problem's samples adjacent. pass@k is the unbiased estimate from all n samples; maj@k votes
    among the first k samples' extracted answers."""
    ks = k_values(n)
    pass_sums, maj_sums = dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0)
    num_problems = len(texts) // n
    for i in range(num_problems):
        group = slice(i * n, (i + 1) * n)
        answers = [extract_answer(task, t) for t in texts[group]]
        for k in ks:
            pass_sums[k] += pass_at_k(n, sum(hits[group]), k)
            maj_sums[k] += majority_correct(answers[:k], hits[group][:k])
    pass_k = {str(k): v / num_problems for k, v in pass_sums.items()}
    maj_k = {str(k): v / num_problems for k, v in maj_sums.items() if k > 1}
    return pass_k, maj_k
