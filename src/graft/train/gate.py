"""The gate before GRPO: sample a probe set and refuse to start when a reward that matters is zero on every
completion. GRPO learns only from differences inside a group, so such a run would spend its budget on
updates with no signal, and the usual cause (the model never writes the asked format) is cheap to fix."""

from __future__ import annotations

from dataclasses import dataclass

from graft.tasks import Task


class GateError(RuntimeError):
    """The probe found a gated reward zero on every completion; the message says what to do."""


@dataclass
class GateResult:
    scores: dict[str, list[float | None]]  # reward name -> one score per probe completion
    gated: list[str]
    example: str  # one probe completion, shown when the gate refuses

    def failing(self) -> list[str]:
        return [name for name in self.gated if not any(s for s in self.scores.get(name, []) if s is not None)]

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name in self.gated:
            values = [s for s in self.scores.get(name, []) if s is not None]
            out[name] = {"mean": sum(values) / len(values) if values else 0.0,
                         "nonzero": sum(1 for v in values if v), "scored": len(values)}  # fmt: skip
        return out


def gated_rewards(task: Task, functions: list[str], configured: list[str] | None) -> list[str]:
    """What must not be all zero: the configured list; else the correctness and format rewards the run
    trains on; else (only other rewards) all of them."""
    if configured:
        return list(configured)
    correctness = task.default_rewards[0]
    gated = [f for f in functions if f == correctness or "format" in f]
    return gated or list(functions)


def check(result: GateResult, n_prompts: int, group_size: int) -> None:
    failing = result.failing()
    if not failing:
        return
    n = n_prompts * group_size
    raise GateError(
        f"gate: before GRPO, {n} sampled completions ({n_prompts} training prompts x {group_size}) scored 0 "
        f"on every one for {', '.join(failing)}. GRPO learns only from differences within a group, so it "
        "would start with no signal. What to do: teach the format first with an SFT warm-up (sft.enabled=true, "
        "or graft sft then model.adapter=runs/<sft run>/final); state the format in the prompt "
        "(task.prompt_format, task.system_prompt); use a partial-credit reward such as format_tags; or allow "
        "longer completions (generation.max_new_tokens). gate.enabled=false skips this check.\n"
        f"  one probe completion: {result.example[:300]!r}"
    )
