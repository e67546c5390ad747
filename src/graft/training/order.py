"""Which training problems a step gets: a seeded shuffled order, reshuffled every epoch, and optionally
prompt selection by difficulty (train.skip_solved): a problem whose groups scored full marks that many times
in a row rests for train.revisit_after epochs, so the steps go to problems that still teach something.
Its state goes in checkpoints, so a resumed run draws what a straight run would."""

from __future__ import annotations

import random

import torch

from graft.tasks import Problem, Task


def solved_groups(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) correctness scores -> (B / G,) bool: every completion of the group fully right (score >= 1).
    Such a group has zero advantage, like an all-wrong one, but it says the problem is learned."""
    return (correct >= 1.0).view(-1, group_size).all(dim=1)


def next_streak(streak: int, solved: bool) -> int:
    """Groups in a row that scored full marks, after one more group: +1 when solved, else back to 0."""
    return streak + 1 if solved else 0


class PromptOrder:
    """The training problems in a seeded order, reshuffled each epoch, less those resting (skip_solved)."""

    def __init__(self, task: Task, seed: int, skip_solved: int = 0, revisit_after: int = 1):
        self.task, self.seed = task, seed
        self.skip_solved, self.revisit_after = skip_solved, revisit_after
        self.epoch = 0
        self.position = 0
        self.streak: dict[int, int] = {}  # problem index -> groups in a row with full marks
        self.resting: dict[int, int] = {}  # problem index -> the epoch it is drawn again from
        self.drawn_in: dict[int, int] = {}  # problem index -> the epoch it was last drawn in
        self.skipped = 0  # draws passed over since the last metrics() (a metric)
        self._index = {id(p): i for i, p in enumerate(task.train)}
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.task.train)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def _rests(self, i: int) -> bool:
        return self.resting.get(i, 0) > self.epoch

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:  # ends even when every problem rests: each pass is an epoch, and rests expire
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            i = self._order[self.position]
            self.position += 1
            if self._rests(i):
                self.skipped += 1
            else:
                out.append(i)
                self.drawn_in[i] = self.epoch
        return out

    def next_problems(self, n: int) -> list[Problem]:
        return [self.task.train[i] for i in self.take(n)]

    def record(self, groups: list[tuple[Problem, bool]]) -> None:
        """After a step: each group drawn, and whether it scored full marks. With train.skip_solved, a problem
        solved that many times in a row sits out the revisit_after epochs after the one it was drawn in; its
        streak stays, so solving it again on its return sends it back to rest at once."""
        if not self.skip_solved:
            return
        for problem, done in groups:
            i = self._index[id(problem)]
            self.streak[i] = next_streak(self.streak.get(i, 0), done)
            if self.streak[i] >= self.skip_solved:
                self.resting[i] = self.drawn_in.get(i, self.epoch) + 1 + self.revisit_after
            if not self.streak[i]:
                del self.streak[i]

    def metrics(self) -> dict[str, float]:
        """Prompt selection since the last call: draws passed over (their problem rested), problems resting."""
        if not self.skip_solved:
            return {}
        skipped, self.skipped = self.skipped, 0
        resting = sum(e > self.epoch for e in self.resting.values())
        return {"sampling/skipped_solved": skipped, "sampling/resting": resting}

    def state(self) -> dict:
        state: dict = {"epoch": self.epoch, "position": self.position}
        if self.skip_solved:  # JSON keys are strings
            state["streak"] = {str(i): s for i, s in self.streak.items()}
            state["resting"] = {str(i): e for i, e in self.resting.items() if e > self.epoch}
        return state

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.streak = {int(i): s for i, s in state.get("streak", {}).items()}
        self.resting = {int(i): e for i, e in state.get("resting", {}).items()}
        self._order = self._shuffled()
