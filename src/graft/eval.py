"""Held-out evaluation: greedy accuracy, completion lengths and truncation on a task's eval split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from graft.rewards.builtin import RewardFn
from graft.rollout.sampler import sample
from graft.tasks.base import Problem, Task


@dataclass
class EvalResult:
    accuracy: float  # share of problems whose correctness reward is 1
    num_problems: int
    mean_length: float  # completion tokens
    truncated_fraction: float
    samples: list[dict[str, str]] = field(default_factory=list)  # a few (prompt, completion, answer)

    def to_dict(self) -> dict:
        return asdict(self)


def encode_prompts(tokenizer, task: Task, problems: list[Problem]) -> list[list[int]]:
    """Prompt token ids through the model's chat template, exactly as in training."""
    encoded = []
    for problem in problems:
        ids = tokenizer.apply_chat_template(task.messages(problem), add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        encoded.append(list(ids))
    return encoded


def decode_completions(tokenizer, token_lists: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(token_lists, skip_special_tokens=True)


def evaluate(
    model,
    tokenizer,
    task: Task,
    correctness: RewardFn,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    num_problems: int | None = None,
    batch_size: int = 32,
    num_samples_kept: int = 4,
) -> EvalResult:
    problems = task.eval[:num_problems] if num_problems else task.eval
    correct = 0.0
    lengths: list[int] = []
    truncated = 0
    kept: list[dict[str, str]] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = sample(
            model,
            encode_prompts(tokenizer, task, chunk),
            group_size=1,
            max_new_tokens=max_new_tokens,
            pad_id=tokenizer.pad_token_id,
            stop_ids=stop_ids,
            greedy=True,
        )
        texts = decode_completions(tokenizer, rollout.completion_token_lists())
        prompts, columns = task.reward_inputs(chunk)
        scores = correctness(prompts, texts, **columns)
        correct += sum(1.0 for s in scores if s is not None and s >= 1.0)
        lengths.extend(rollout.completion_lengths.tolist())
        truncated += int(rollout.truncated.sum())
        for p, text in zip(chunk, texts, strict=True):
            if len(kept) < num_samples_kept:
                kept.append({"prompt": p.prompt, "completion": text, "answer": p.answer})
    model.train(was_training)
    n = len(problems)
    return EvalResult(
        accuracy=correct / n,
        num_problems=n,
        mean_length=sum(lengths) / n,
        truncated_fraction=truncated / n,
        samples=kept,
    )
