"""Learning curves at equal wall-clock: graft vs TRL's GRPOTrainer on the same recipe, model and machine.

Each framework trains the recipe (default: the demo, configs/arithmetic.yaml) for the same budget of
training time, per seed, in its own subprocess; a run also ends at the recipe's train.max_steps, over which
both take the recipe's learning-rate schedule. Both are evaluated by the same code (graft's greedy
`evaluate` with the recipe's correctness reward) on the same held-out problems every few steps; the clock
stops while they are evaluated, and model loading is not counted. Accuracy at a wall-clock mark is that of
the last evaluation at or before it. Writes curves.json, table.md and curves.png to --out.

    pip install -e '.[bench]'
    python benchmarks/learning.py                                  # 3 seeds x 10 min each (~80 min)
    python benchmarks/learning.py --minutes 2 --seeds 1            # a quick look
    python benchmarks/learning.py --trl-set learning_rate=1e-4     # TRL with other settings
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = str(Path(__file__).resolve().parent.parent / "configs" / "arithmetic.yaml")


def recipe(args: argparse.Namespace, seed: int, out_dir: str | None = None):
    from graft.config import load_config

    overrides = [f"train.seed={seed}", *args.set]
    if out_dir is not None:
        overrides += [
            f"train.max_minutes={args.minutes}",
            f"eval.every_n_steps={args.graft_eval_every}",
            "eval.at_start=true",
            "eval.num_samples=0",
            "checkpoint.every_n_steps=0",
            f"logging.output_dir={out_dir}",
            "logging.run_name=learning",
            "logging.progress=lines",
            "logging.print_config=false",
        ]
    return load_config(args.recipe, overrides)


# ------------------------------------------------------------------------------------------- workers


def worker_graft(args: argparse.Namespace, seed: int) -> dict:
    from graft.quiet import quiet_libraries
    from graft.training.loop import train

    quiet_libraries()
    with tempfile.TemporaryDirectory() as scratch:
        out = scratch if args.graft_runs is None else str(Path(args.graft_runs) / f"seed-{seed}")
        run = train(recipe(args, seed, out))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        after = json.loads((run / "eval.json").read_text()).get("after", {})
    clock, points, steps = 0.0, [], []
    for row in rows:  # a step's row carries its time and, on evaluation steps, the accuracy after it
        clock += row.get("time/step", 0.0)
        if "time/step" in row:
            steps.append(row["time/step"])
        if "eval/accuracy" in row:
            points.append((clock, row["eval/accuracy"]))
    return {
        "points": points,
        "steps": len(steps),
        "step_s": statistics.median(steps),
        "train_s": sum(steps),
        "by_kind": after.get("accuracy_by_kind", {}),
        "alarms": alarms_raised(rows),
    }


def alarms_raised(rows: list[dict]) -> dict[str, int]:
    """How often each health alarm started firing (what the console prints), from the metrics rows."""
    counts: dict[str, int] = {}
    before: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("health/"):
                if value and not before.get(key):
                    counts[key.removeprefix("health/")] = counts.get(key.removeprefix("health/"), 0) + 1
                before[key] = value
    return counts


def worker_trl(args: argparse.Namespace, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from graft.evaluation import evaluate
    from graft.models import resolve_model_path, stop_token_ids
    from graft.quiet import quiet_libraries
    from graft.rewards import BUILTIN_REWARDS
    from graft.tasks import build_task

    quiet_libraries()
    cfg = recipe(args, seed)
    task = build_task(cfg.task)
    correctness = BUILTIN_REWARDS[task.default_rewards[0]]
    path = resolve_model_path(cfg.model)  # the same weights graft trains
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": task.messages(p), "answer": p.answer} for p in task.train]

    def reward(prompts, completions, answer, **kwargs):
        return correctness(prompts, [c[-1]["content"] for c in completions], answer)

    g, t = cfg.grpo, cfg.train
    settings = dict(
        per_device_train_batch_size=g.num_generations * t.prompts_per_step,  # completions per step
        num_generations=g.num_generations,
        max_completion_length=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high or g.epsilon,
        num_iterations=g.num_iterations,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        # the recipe's schedule over the recipe's steps (the budget may end a run before its last)
        lr_scheduler_type="cosine" if t.lr_scheduler == "cosine" else "constant_with_warmup",
        max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
    )
    settings.update(trl_settings(args.trl_set))
    points: list[tuple[float, float]] = []
    state = {"clock": 0.0, "steps": 0, "step_s": []}

    def accuracy(model) -> float:
        result = evaluate(
            model, tokenizer, task, correctness,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.generation.max_new_tokens,
            stop_ids=stop_token_ids(model, tokenizer), batch_size=cfg.eval.batch_size,
        )  # fmt: skip
        return result.accuracy

    class Clock(TrainerCallback):  # step time only; evaluation happens with the clock stopped
        def on_step_begin(self, a, s, control, **k):
            self.start = time.perf_counter()

        def on_step_end(self, a, s, control, model=None, **k):
            seconds = time.perf_counter() - self.start
            state["clock"] += seconds
            state["steps"] += 1
            state["step_s"].append(seconds)
            done = state["clock"] >= 60 * args.minutes
            if done or state["steps"] % args.trl_eval_every == 0:
                points.append((state["clock"], accuracy(model)))
            control.should_training_stop = done

    torch.manual_seed(seed)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        reward_funcs=reward,
        args=GRPOConfig(
            output_dir=tempfile.mkdtemp(), logging_steps=10, save_strategy="no",
            report_to="none", use_cpu=True, seed=seed, dataloader_num_workers=0, **settings,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
            lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
        ),
        callbacks=[Clock()],
    )  # fmt: skip
    points.append((0.0, accuracy(trainer.model)))
    trainer.train()
    return {"points": sorted(points), "steps": state["steps"], "step_s": statistics.median(state["step_s"]),
            "settings": settings}  # fmt: skip


def trl_settings(items: list[str]) -> dict:
    """--trl-set key=value pairs: a value that reads as JSON (numbers, true, null, lists) is that, any other
    text is the string itself (report_to=tensorboard, lr_scheduler_type=cosine)."""
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--trl-set {item!r}: write key=value, e.g. learning_rate=1e-4")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


# ------------------------------------------------------------------------------------------- summary


def accuracy_at(points: list[list[float]], seconds: float) -> float:
    """The last evaluation at or before `seconds` of training."""
    return [acc for t, acc in points if t <= seconds + 1e-9][-1]


def time_to(points: list[list[float]], target: float) -> float | None:
    """Training seconds until an evaluation first reached `target` (None: never)."""
    return next((t for t, acc in points if acc >= target - 1e-9), None)


def summarize(runs: list[dict], minutes: float) -> str:
    marks = [minutes * 60 * f for f in (0.1, 0.2, 1 / 3, 0.5, 0.75, 1.0)]
    frameworks = list(dict.fromkeys(r["framework"] for r in runs))
    head = "| framework | " + " | ".join(f"{m / 60:.1f} min" for m in marks) + " | steps | s/step |"
    lines = [head, "|" + " --- |" * (len(marks) + 3)]
    for fw in frameworks:
        mine = [r for r in runs if r["framework"] == fw]
        cells = []
        for m in marks:
            values = [accuracy_at(r["points"], m) for r in mine]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        steps = statistics.median(r["steps"] for r in mine)
        step_s = statistics.median(r["step_s"] for r in mine)
        lines.append(f"| {fw} | " + " | ".join(cells) + f" | {steps:.0f} | {step_s:.2f} |")
    if {"graft", "trl"} <= set(frameworks):
        lines.append("")
        for seed in sorted({r["seed"] for r in runs}):
            by = {r["framework"]: r for r in runs if r["seed"] == seed}
            if len(by) < 2:
                continue
            trl_final = by["trl"]["points"][-1][1]
            reach = time_to(by["graft"]["points"], trl_final)
            graft_at = accuracy_at(by["graft"]["points"], by["trl"]["points"][-1][0])
            when = (
                "never"
                if reach is None
                else f"{reach / 60:.1f} min ({reach / by['trl']['points'][-1][0]:.2f} of TRL's)"
            )
            lines.append(
                f"- seed {seed}: TRL ends at {trl_final:.3f}; graft reaches it at {when}; "
                f"graft at TRL's full budget: {graft_at:.3f}"
            )
    return "\n".join(lines)


def plot(runs: list[dict], minutes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [minutes * 60 * i / 100 for i in range(101)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for fw, color in zip(
        dict.fromkeys(r["framework"] for r in runs), ("tab:green", "tab:blue"), strict=False
    ):
        curves = [[accuracy_at(r["points"], t) for t in grid] for r in runs if r["framework"] == fw]
        columns = list(zip(*curves, strict=True))
        x = [t / 60 for t in grid]
        ax.step(x, [statistics.median(c) for c in columns], where="post", color=color,
                label=f"{fw} (median of {len(curves)} seeds)")  # fmt: skip
        ax.fill_between(x, [min(c) for c in columns], [max(c) for c in columns], step="post", color=color,
                        alpha=0.2)  # fmt: skip
    ax.set_xlabel("training wall-clock (min)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=RECIPE, help="graft recipe both frameworks train")
    parser.add_argument("--set", nargs="*", default=[], help="graft overrides for the recipe (both follow)")
    parser.add_argument("--trl-set", nargs="*", default=[], help="GRPOConfig fields to change, key=value")
    parser.add_argument("--frameworks", default="graft,trl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per run")
    parser.add_argument(
        "--graft-eval-every",
        type=int,
        default=5,
        help="graft: evaluate every N steps (reads the time to an accuracy finely)",
    )
    parser.add_argument("--trl-eval-every", type=int, default=6, help="TRL: evaluate every N steps")
    parser.add_argument("--out", default="benchmarks/results/learning")
    parser.add_argument("--graft-runs", help="keep graft's run directories here (seed-S each); default: none")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        framework, seed = args.worker.split(":")
        work = worker_graft if framework == "graft" else worker_trl
        print(json.dumps(work(args, int(seed))))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:  # frameworks alternate, so both see the same machine state
        for framework in args.frameworks.split(","):
            given = sys.argv[1:] if argv is None else argv
            cmd = [sys.executable, __file__, "--worker", f"{framework}:{seed}", *given]
            start = time.perf_counter()
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{framework} seed {seed} failed")
            run = {"framework": framework, "seed": seed, **json.loads(proc.stdout.strip().splitlines()[-1])}
            runs.append(run)
            graft_only = f", by kind {run['by_kind']}, alarms {run['alarms']}" if framework == "graft" else ""
            print(f"{framework} seed {seed}: {run['steps']} steps, final {run['points'][-1][1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s with loading and evaluation){graft_only}",
                  flush=True)  # fmt: skip
            (out / "curves.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    table = summarize(runs, args.minutes)
    (out / "table.md").write_text(table + "\n")
    plot(runs, args.minutes, out / "curves.png")
    print(table)
    print(f"written: {out}/curves.json, table.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
