"""Sampling metrics on plain numbers: pass@k (unbiased, from n samples) and maj@k (majority vote)."""

from __future__ import annotations

from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them correct) is
    correct: 1 - C(n-c, k) / C(n, k), the unbiased estimator of Chen et al. (2021). Needs k <= n."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Is the most common extracted answer right? Completions without an answer (None) do not vote; a tie
    goes to the answer seen first; no answer at all counts as wrong. `correct[i]` scores completion i."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)  # first seen among the tied
    return correct[answers.index(winner)]


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself: the k reported for n samples per problem."""
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    return sorted(set(ks + [n]))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default), 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
