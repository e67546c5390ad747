"""The CPU fast path as the training loop sees it: one object, two calls.

- `sample(...)`: a rollout from the sampling copy (graft's decoder on packed weights, or a 16-bit copy),
  recording its forward when the update will replay it;
- `replay_backward(...)`: the update's gradients from that recording (graft.cpu.replay), or None, and the
  loop runs its own forward and backward.

Which parts are on is graft.cpu.plan's decision (`FastPaths`), the only place that decides it.
"""

from __future__ import annotations

from collections.abc import Callable

from graft.algo import PolicyLossOutput
from graft.cpu.decoder import Recording
from graft.cpu.plan import FastPaths
from graft.cpu.replay import replay_backward
from graft.cpu.sampling import SamplingCopy
from graft.rollout.sampler import Rollout, sample


class FastPath:
    """The sampling copy the plan chose, and the recording of the last rollout it sampled for an update."""

    def __init__(self, policy, paths: FastPaths):
        self.paths = paths
        self.copy = SamplingCopy(
            policy, paths.sampling_dtype, pack=paths.pack, own_decoder=bool(paths.own_decoder)
        )
        self._recorded: tuple[Rollout, Recording] | None = None  # the last recorded rollout and its forward

    @classmethod
    def build(cls, policy, paths: FastPaths) -> FastPath | None:
        """The fast path for this run, or None when the plan takes none of it (the generic path runs)."""
        return cls(policy, paths) if paths.sampling_copy else None

    def sample(self, policy, prompts: list[list[int]], *, for_update: bool = True, **options) -> Rollout:
        """graft.rollout.sample through the sampling copy, refreshed with the policy's weights. With
        `for_update` and a replayed update planned, the forward is recorded for replay_backward."""
        self._recorded = None
        recording = Recording() if for_update and self.paths.replay else None
        with self.copy.sampling(policy, recording) as model:
            rollout = sample(model, prompts, **options)
        if recording is not None and rollout.completion_ids.shape[1] >= 2:  # < 2: no decode call to replay
            self._recorded = (rollout, recording)
        return rollout

    def replay_backward(
        self, policy, rollout: Rollout, temperature: float, loss_fn: Callable
    ) -> PolicyLossOutput | None:
        """loss_fn's output (graft.algo.PolicyLossOutput) with the LoRA gradients of the whole rollout added
        to .grad, from the recorded forward; None when `rollout` was not recorded (then nothing is done).
        Consumes the recording: one update per rollout."""
        if self._recorded is None or self._recorded[0] is not rollout:
            return None
        recording = self._recorded[1]
        self._recorded = None
        return replay_backward(policy, recording, rollout, temperature, loss_fn)

    def drop_recording(self) -> None:
        """Free a recording the update will not use (its tensors are a whole forward's activations)."""
        self._recorded = None
