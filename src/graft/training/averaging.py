"""An exponential moving average of the trained weights (train.ema_decay), kept beside the live policy.

Rollouts and updates use the live weights; evaluations and the final adapter use the average, which smooths
out the answers a sharpened policy flips from one step to the next. Kept in checkpoints, so a resumed run
averages on exactly as a straight one.
"""

from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    # over the trained parameters only: torch.optim.swa_utils.AveragedModel would deep-copy the whole
    # model, the frozen base weights under a LoRA adapter included
    def __init__(self, params: list[torch.nn.Parameter], decay: float | None):
        self.params, self.decay = params, decay
        # None when off; otherwise one tensor per trained parameter, starting at its initial value
        self.average = None if decay is None else [p.detach().clone() for p in params]

    def after_step(self) -> None:
        """average <- decay * average + (1 - decay) * weights, after each optimizer step's update."""
        if self.average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the live parameters for the duration; the live ones put back exactly."""
        if self.average is None:
            yield
            return
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], self.average)
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], live)

    def state(self) -> dict | None:
        return None if self.average is None else {"average": [a.clone() for a in self.average]}

    def restore(self, state: dict | None) -> None:
        """Call after the weights are restored: a checkpoint saved without an average (train.ema_decay
        switched on at resume) starts it at the restored weights."""
        if self.average is not None:
            with torch.no_grad():
                saved = state["average"] if state is not None else [p.detach() for p in self.params]
                torch._foreach_copy_(self.average, saved)
