"""pass@k, maj@k and the eval aggregation against counts done by hand."""

import pytest

from graft.config import TaskConfig
from graft.evaluation.core import sampled_metrics
from graft.evaluation.metrics import k_values, majority_correct, pass_at_k, percentile
from graft.tasks import build_task


def test_pass_at_k_by_hand():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_by_hand():
    assert majority_correct(["7", "7", "8"], [True, True, False]) is True
    assert majority_correct(["8", "7", "8"], [False, True, False]) is False
    assert majority_correct(["8", "7"], [False, True]) is False  # tie: the answer seen first wins
    assert majority_correct([None, None, "7"], [False, False, True]) is True  # no answer does not vote
    assert majority_correct([None, None], [False, False]) is False


def test_k_values_and_percentile():
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([], 95) == 0.0


def test_sampled_metrics_on_a_fixture_with_known_answers():
    task = build_task(TaskConfig(num_train=10, num_eval=4))  # plain format, last_integer correctness
    # two problems, gold 5 and 9, four samples each (hits as the correctness reward would score them)
    texts = ["5", "The answer is 5", "6", "no idea",
             "8", "8", "9", "7"]  # fmt: skip
    hits = [True, True, False, False, False, False, True, False]
    pass_k, maj_k = sampled_metrics(task, texts, hits, n=4)
    # problem 1: c=2 -> pass@1 0.5, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@4 1
    # problem 2: c=1 -> pass@1 0.25, pass@2 0.5, pass@4 1
    assert pass_k == pytest.approx({"1": 0.375, "2": (5 / 6 + 0.5) / 2, "4": 1.0})
    # maj@2: p1 first two answers 5, 5 -> right; p2 8, 8 -> wrong => 0.5
    # maj@4: p1 votes 5,5,6 (None abstains) -> 5 right; p2 8,8,9,7 -> 8 wrong => 0.5
    assert maj_k == pytest.approx({"2": 0.5, "4": 0.5})


def test_unseen_phrasings_are_scored_beside_the_held_out_split():
    from conftest import build_tiny_model, build_tiny_tokenizer
    from graft.evaluation import evaluate
    from graft.tasks.base import Problem

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    task = build_task(TaskConfig(num_train=10, num_eval=4))
    task.eval = [Problem("What is 1 + 1?", "1"), Problem("What is 2 + 2?", "0")]
    task.unseen = [Problem(f"How much is {i} plus 1?", a) for i, a in enumerate("1000")]

    def gold_says(prompts, completions, answer, **_):  # scores the gold column, whatever the model wrote
        return [float(a) for a in answer]

    run = dict(max_new_tokens=3, stop_ids=[2], batch_size=3)
    result = evaluate(model, tokenizer, task, gold_says, **run)
    assert result.accuracy == 0.5 and result.unseen_accuracy == 0.25  # 1 of 2, 1 of 4
    assert evaluate(model, tokenizer, task, gold_says, num_problems=1, **run).unseen_accuracy == 1.0
    explicit = evaluate(model, tokenizer, task, gold_says, problems=task.unseen[1:], **run)
    assert explicit.accuracy == 0.0 and explicit.unseen_accuracy is None  # a chosen list is measured alone


def test_accuracy_is_broken_down_by_problem_kind():
    from conftest import build_tiny_model, build_tiny_tokenizer
    from graft.evaluation import evaluate
    from graft.tasks.base import Problem

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    task = build_task(TaskConfig(num_train=10, num_eval=4))
    kinds = ["addition", "subtraction", "addition", "addition", None]
    task.eval = [
        Problem(f"What is {i}?", a, kind=k) for i, (a, k) in enumerate(zip("10110", kinds, strict=True))
    ]

    def gold_says(prompts, completions, answer, **_):
        return [float(a) for a in answer]

    result = evaluate(model, tokenizer, task, gold_says, max_new_tokens=2, stop_ids=[2], batch_size=2)
    # gold scores 1 0 1 1 0: addition (problems 0, 2, 3) 3 of 3, subtraction (1) 0 of 1; problem 4 has no
    # kind and counts in the accuracy only
    assert result.accuracy_by_kind == {"addition": 1.0, "subtraction": 0.0}
    assert result.accuracy == 3 / 5
