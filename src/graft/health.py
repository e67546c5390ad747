"""Training-health alarms that explain themselves: what was seen, why it matters, what to try.

The monitor reads the same per-step metrics that go to metrics.jsonl. An alarm is reported when it starts
firing (not every step while it lasts) and shows as `health/<name>` = 1 in the metrics while it fires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graft.config import HealthConfig


@dataclass(frozen=True)
class Alarm:
    name: str
    saw: str
    why: str
    fix: str

    def message(self) -> str:
        return f"[{self.name}] {self.saw}. {self.why[:1].upper()}{self.why[1:]}. Try: {self.fix}."


ALARMS = (
    "truncation",
    "no_signal",
    "entropy_collapse",
    "length_drift",
    "kl_blowup",
    "sampler_mismatch",
    "format_hacking",
    "nonfinite",
)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class HealthMonitor:
    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.history: list[dict[str, float]] = []  # the numeric metrics of every step so far
        self.firing: set[str] = set()

    def state(self) -> dict:
        return {"history": self.history, "firing": sorted(self.firing)}

    def restore(self, state: dict) -> None:
        self.history, self.firing = list(state["history"]), set(state["firing"])

    def _series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if isinstance(h.get(key), int | float) and math.isfinite(h[key])]

    def _start_and_now(self, key: str) -> tuple[float, float] | None:
        """Mean of the first and of the last window of a metric, once there are two full windows."""
        series, w = self._series(key), self.cfg.window
        return (_mean(series[:w]), _mean(series[-w:])) if len(series) >= 2 * w else None

    def _alarms(self, m: dict) -> list[Alarm]:
        c, w = self.cfg, self.cfg.window
        found = []
        recent = self.history[-w:]

        trunc = _mean([h.get("truncated_fraction", 0.0) for h in recent])
        if trunc > c.truncation_max:
            found.append(
                Alarm(
                    "truncation",
                    f"{trunc:.0%} of completions hit generation.max_new_tokens over the last {len(recent)} steps",
                    "a cut-off completion rarely holds a final answer, so its reward is 0 for the wrong reason",
                    "raise generation.max_new_tokens, or ask for shorter answers in the system prompt",
                )
            )
        zero = _mean([h.get("zero_variance_group_fraction", 0.0) for h in recent])
        if len(recent) == w and zero > c.zero_variance_max:
            found.append(
                Alarm(
                    "no_signal",
                    f"{zero:.0%} of groups had identical rewards over the last {w} steps",
                    "such a group has zero advantage and teaches nothing: the task is too easy or too hard",
                    "change the task difficulty, raise grpo.num_generations, or raise generation.temperature",
                )
            )
        entropy = self._start_and_now("entropy")
        if entropy:
            start, now = entropy
            if start > 0 and now < c.entropy_collapse_ratio * start:
                found.append(
                    Alarm(
                        "entropy_collapse",
                        f"token entropy fell from {start:.3f} to {now:.3f} nats",
                        "the policy has become nearly deterministic, so groups stop differing and learning stalls",
                        "lower train.learning_rate, use grpo.epsilon_high (clip-higher), or add a KL term (grpo.beta)",
                    )
                )
        lengths = self._start_and_now("completion_length/mean")
        accuracy = self._start_and_now("accuracy")
        learned = accuracy is not None and accuracy[1] - accuracy[0] >= c.length_drift_explained_gain
        if lengths and not learned:
            start, now = lengths
            if start > 0 and not (1 / c.length_drift_ratio <= now / start <= c.length_drift_ratio):
                found.append(
                    Alarm(
                        "length_drift",
                        f"mean completion length moved from {start:.1f} to {now:.1f} tokens",
                        "length is moving the reward: fine if truncation is going away, a warning sign if the reward "
                        "is being won by length rather than correctness",
                        "check the completions log, use grpo.loss_type=dr_grpo (no length bias) or a length penalty",
                    )
                )
        kl = m.get("kl")
        if isinstance(kl, int | float) and kl > c.kl_max:
            found.append(
                Alarm(
                    "kl_blowup",
                    f"KL to the reference is {kl:.3f} (limit {c.kl_max})",
                    "the policy is running away from the base model, which usually ends in gibberish",
                    "lower train.learning_rate or raise grpo.beta",
                )
            )
        mismatch = m.get("sampler_kl")  # only a rollout engine with its own numerics (vLLM) logs it
        if isinstance(mismatch, int | float) and mismatch > c.sampler_kl_max:
            found.append(
                Alarm(
                    "sampler_mismatch",
                    f"the rollout engine's log-probs are {mismatch:.4f} nats (KL) from the trainer's "
                    f"(limit {c.sampler_kl_max})",
                    "the engine no longer samples the policy being trained: a missed weight sync, or a dtype "
                    "or temperature that differs between the two",
                    "check generation.dtype against model.dtype; keep grpo.tis_cap set; or generation.backend=graft",
                )
            )
        for key in [k for k in m if k.startswith("reward/") and "format" in k and k.endswith("/mean")]:
            fmt = self._start_and_now(key)
            if fmt and accuracy:
                rise, gain = fmt[1] - fmt[0], accuracy[1] - accuracy[0]
                if rise > c.format_gap and gain < c.format_gap / 4:
                    found.append(
                        Alarm(
                            "format_hacking",
                            f"{key} rose by {rise:.2f} while accuracy moved {gain:+.2f}",
                            "the model is learning to look right, not to be right (reward hacking)",
                            "lower that reward's weight in rewards.weights, or make correctness worth more",
                        )
                    )
        loss = m.get("loss")
        if m.get("nonfinite_skipped") or (loss is not None and not math.isfinite(loss)):
            found.append(
                Alarm(
                    "nonfinite",
                    f"{m.get('nonfinite_skipped', 0)} update(s) this step had a non-finite loss or gradient",
                    "they were skipped; more in a row stop the run",
                    "lower train.learning_rate, keep train.max_grad_norm, check rewards for huge values",
                )
            )
        return found

    def check(self, metrics: dict) -> list[Alarm]:
        """Record a step's metrics; return the alarms that start firing now. Adds health/<name> to metrics."""
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        alarms = self._alarms(metrics)
        names = {a.name for a in alarms}
        for name in ALARMS:  # every alarm, every step: a column per alarm in metrics.jsonl and the trackers
            metrics[f"health/{name}"] = 1.0 if name in names else 0.0
        new = [a for a in alarms if a.name not in self.firing]
        self.firing = names
        return new
