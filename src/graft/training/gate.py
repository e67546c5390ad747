"""The gate before GRPO: sample a probe set and refuse to start when a reward that matters is zero on every
completion. GRPO learns only from differences inside a group, so such a run would spend its budget on
updates with no signal, and the usual cause (the model never writes the asked format) is cheap to fix."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from graft.checks.calls import gate_problem
from graft.rewards.runtime import RewardRuntime, reward_name
from graft.tasks import Task
from graft.training.grpo import sample_groups
from graft.training.scoring import reward_inputs
from graft.training.setup import StepSetup


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
            out[name] = {
                "mean": sum(values) / len(values) if values else 0.0,
                "nonzero": sum(1 for v in values if v),
                "scored": len(values),
            }
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


def run_gate(setup: StepSetup, correctness_runtime: RewardRuntime, run, display) -> None:
    """Probe before the first step, sampling exactly as the steps will; writes gate.json and raises GateError
    when a gated reward is zero on every completion. `correctness_runtime` scores correctness when the rewards do not."""
    cfg, task = setup.cfg, setup.task

    def score(prompts, completions, columns) -> dict[str, list]:
        scores = {reward_name(k): v for k, v in setup.rewards.score(prompts, completions, columns).items()}
        if setup.correctness_name not in scores:
            scores[setup.correctness_name] = correctness_runtime.scorer(setup.correctness_name)(
                prompts, completions, **columns
            )
        return scores

    functions = [reward_name(f) for f in (cfg.rewards.functions or task.default_rewards)]
    problem = gate_problem(cfg, functions, setup.correctness_name)  # validate's check, for library callers
    if problem:
        raise GateError(problem)
    gated = gated_rewards(task, functions, cfg.gate.rewards)
    display.print(f"gate: probing {cfg.gate.num_prompts} training prompts x {cfg.grpo.num_generations} ...")
    # its own generator: the run's sampling sequence is the same with the gate on or off
    probe = dataclasses.replace(
        setup, generator=torch.Generator(device=setup.device).manual_seed(cfg.train.seed + 7919)
    )
    limit = min(max(cfg.gate.max_prompts, cfg.gate.num_prompts), len(task.train))
    probed, scores, example = 0, {}, ""
    while True:  # rounds of num_prompts, until every gated reward scored somewhere or the limit
        problems = task.train[probed : min(probed + cfg.gate.num_prompts, limit)]
        rollout = sample_groups(probe, problems, for_update=False)
        texts, prompts, columns = reward_inputs(setup.tokenizer, task, problems, rollout, cfg)
        for name, values in score(prompts, texts, columns).items():
            scores.setdefault(name, []).extend(values)
        example = example or (texts[0] if texts else "")
        probed += len(problems)
        result = GateResult(scores, gated, example)
        if not result.failing() or probed >= limit:
            break
        display.print(f"gate: none scored yet for {', '.join(result.failing())}; probing more prompts ...")
    run.write_json("gate.json", {"passed": not result.failing(), "rewards": result.summary()})
    check(result, probed, cfg.grpo.num_generations)
    parts = [
        f"{n} mean {v['mean']:.2f} ({v['nonzero']}/{v['scored']} nonzero)"
        for n, v in result.summary().items()
    ]
    display.print("gate passed: " + "; ".join(parts))
