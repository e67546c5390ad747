"""The entropy bonus's weight from step to step (grpo.entropy_coef, grpo.entropy_target): fixed, or adapted
after each step to the entropy the step's rollout measured (graft.algo.entropy). Kept in checkpoints."""

from __future__ import annotations

from graft import algo
from graft.config import GrpoConfig


class EntropyControl:
    def __init__(self, cfg: GrpoConfig):
        self.cfg = cfg
        self.coef = cfg.entropy_coef  # the weight the next update uses

    def after_step(self, metrics: dict) -> None:
        """Adapt the weight to the step's mean token entropy (the sampler's, or its sampled estimate, the
        mean surprisal, where the engine logs none); every rank sees the same reduced metrics."""
        measured = metrics.get("entropy", metrics.get("surprisal"))
        if self.cfg.entropy_target is not None and measured is not None:
            c = self.cfg
            self.coef = algo.adapt_entropy_coef(
                self.coef, measured, c.entropy_target, c.entropy_coef_step, c.entropy_coef_max
            )

    def state(self) -> dict:
        return {"coef": self.coef}

    def restore(self, state: dict) -> None:
        self.coef = float(state["coef"])
