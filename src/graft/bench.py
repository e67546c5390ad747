"""Side-by-side GRPO step benchmark: graft vs TRL's GRPOTrainer on the same model, settings and machine.

Each framework runs in its own subprocess (so peak RSS is its own), and the subprocesses alternate
(graft, TRL, graft, TRL, ...) so that both see the same machine state. Both sample exactly
`max_new_tokens` tokens per completion (stop tokens held back), so they do the same amount of work.

`--task wordle` measures multi-turn GRPO steps instead: whole Wordle games against graft's environment,
graft only (TRL has no multi-turn trainer to compare), episodes ending as they would in training.

    python benchmarks/grpo_step.py            # or: graft bench
    graft bench --task wordle                 # episodes/s of graft's multi-turn steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEM_PROMPT = "You are a calculator. Reply with the result only, as a plain integer."


# graft's workers: (config overrides, environment). graft-bf16 is mixed precision (sampling from a bf16
# copy of the merged policy, training under bf16 autocast with float32 weights and Adam; compared with
# TRL's own bf16 mode, trl-bf16). The others switch one fast path off, to show what each buys on this CPU.
GRAFT_VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "graft": ([], {}),
    "graft-bf16": (["generation.dtype=bfloat16", "train.autocast=bfloat16"], {}),
    "graft-unpacked": ([], {"GRAFT_CPU_UNSUPPORTED": "packed_float32"}),  # graft's decoder on F.linear
    "graft-noreplay": (["train.replay=false"], {}),  # a second forward in the update
    "graft-hf": (["generation.pack_weights=false"], {}),  # sampling through the transformers model
}
BF16_WORKERS = ("graft-bf16", "trl-bf16")


def bench_overrides(args: argparse.Namespace, out_dir: str) -> list[str]:
    """The graft config of the benchmark; the TRL worker mirrors every value. --task wordle: GRPO on whole
    games (no SFT warm-up), max_new_tokens per turn, stop tokens not held back, so that episodes end as
    they would in training (the game is over, a turn is cut, or max_turns); graft's own micro-batch size,
    as configs/wordle.yaml (episodes take the two-pass update, whose activations grow with the micro-batch:
    the whole batch of 16 episodes at once took ~1.5x the peak RSS of 8)."""
    if args.task == "wordle":
        task = ["task.name=wordle", f"episode.max_turns={args.max_turns}", "sft.enabled=false"]
    else:  # exactly max_new_tokens per completion, as the TRL worker
        task = [
            f"task.system_prompt='{SYSTEM_PROMPT}'",
            f"generation.min_new_tokens={args.max_new_tokens}",
            # the whole batch in one pass, as TRL's per_device_train_batch_size below (graft's default of 8
            # gives the same gradients, tests/training/test_grpo.py; 16 at once is faster on this CPU)
            f"train.micro_batch_size={args.num_generations * args.prompts_per_step}",
        ]
    return [
        f"lora.r={args.lora_r}",
        f"lora.alpha={2 * args.lora_r}",
        *task,
        f"grpo.num_generations={args.num_generations}",
        "grpo.beta=0.0",
        "grpo.num_iterations=1",
        "grpo.loss_type=dapo",
        f"generation.max_new_tokens={args.max_new_tokens}",
        "generation.temperature=1.0",
        f"train.prompts_per_step={args.prompts_per_step}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.warmup_steps=0",
        "eval.at_start=false",
        "eval.at_end=false",
        "eval.every_n_steps=0",
        "gate.enabled=false",  # forced 64-token completions are not about learning; TRL has no probe either
        "checkpoint.every_n_steps=0",
        f"logging.output_dir={out_dir}",
        "logging.run_name=bench",
        f"model.device={args.device}",
        "model.dtype=float32",  # as the TRL worker loads it (the -bf16 modes change the products, not this)
        *GRAFT_VARIANTS.get(args.worker, ([], {}))[0],
        "logging.progress=lines",
        "logging.print_config=false",
    ]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------- workers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker_graft(args: argparse.Namespace) -> dict:
    from graft.config import load_config
    from graft.quiet import quiet_libraries
    from graft.training.loop import train

    quiet_libraries()
    with tempfile.TemporaryDirectory() as out:
        run = train(load_config(None, bench_overrides(args, out)))
        rows, logged = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "completions.jsonl")
    steps = [r for r in rows if "time/step" in r][args.warmup :]
    result = {
        "step_s": [r["time/step"] for r in steps],
        "rollout_s": [r["time/rollout"] for r in steps],
        "reward_s": [r["time/reward"] for r in steps],
        "train_s": [r["time/train"] for r in steps],
        "replayed": [r["replayed"] for r in steps],  # train.replay: no training forward
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.task == "wordle":
        # episodes played: the completions log has one row per episode; completion_length counts the
        # environment's turns too, episodes/env_tokens those alone (both means over the step's episodes)
        episodes = [sum(c["step"] == r["step"] for c in logged) for r in steps]
        result["episodes"] = episodes
        result["turns_per_episode"] = [r["episodes/turns"] for r in steps]
        result["model_tokens"] = [
            round((r["completion_length/mean"] - r["episodes/env_tokens"]) * n)
            for r, n in zip(steps, episodes, strict=True)
        ]
        result["env_tokens"] = [
            round(r["episodes/env_tokens"] * n) for r, n in zip(steps, episodes, strict=True)
        ]
        result["done_fraction"] = [r["episodes/done"] for r in steps]  # the game ended (won or lost)
    else:
        result["completion_tokens"] = [
            r["completion_length/mean"] * args.num_generations * args.prompts_per_step for r in steps
        ]
    return result


def worker_trl(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from graft.config import ModelConfig, TaskConfig
    from graft.models import resolve_model_path
    from graft.quiet import quiet_libraries
    from graft.rewards.builtin import last_integer
    from graft.tasks import build_task

    quiet_libraries()
    path = resolve_model_path(ModelConfig())  # the same cached safetensors graft trains
    task = build_task(TaskConfig(system_prompt=SYSTEM_PROMPT))
    rows = [
        {"prompt": task.messages(p), "answer": p.answer} for p in task.train[: 64 * args.prompts_per_step]
    ]
    timings: dict[str, list[float]] = {"generate": [], "reward": [], "step": [], "tokens": []}

    def correctness(prompts, completions, answer, **kwargs):  # a TRL reward function around graft's grader
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = last_integer(prompts, texts, answer)
        timings["reward"].append(time.perf_counter() - start)
        return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            timings["step"].append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.worker == "trl-bf16",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        reward_funcs=correctness,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),  # fmt: skip
        callbacks=[StepTimer()],
    )
    generate = trainer._generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        timings["generate"].append(time.perf_counter() - start)
        timings["tokens"].append(sum(len(ids) for ids in out[1]))  # completion_ids per completion
        return out

    trainer._generate = timed_generate
    trainer.train()
    w = args.warmup
    step, gen, rew = timings["step"][w:], timings["generate"][w:], timings["reward"][w:]
    return {
        "step_s": step,
        "rollout_s": gen,
        "reward_s": rew,
        "train_s": [s - g - r for s, g, r in zip(step, gen, rew, strict=True)],
        "completion_tokens": timings["tokens"][w:],
        "peak_rss_mb": peak_rss_mb(),
    }


# ------------------------------------------------------------------------------------------- FLOPs


def matmul_peak_gflops(seconds: float = 3.0, n: int = 2048) -> float:
    """The machine's fp32 matmul rate, measured: the ceiling any training step can approach."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def step_gflop(args: argparse.Namespace, prompt_len: int, replayed: bool = False) -> float:
    """Work of one step: sampling forward passes + training forward + backward to the activations (LoRA
    needs no base-weight gradients, so backward costs about one forward). Matmuls only. `replayed`
    (graft's train.replay): no training forward through the layers, only through the LM head."""
    from transformers import AutoConfig

    from graft.config import ModelConfig
    from graft.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(ModelConfig()))
    d, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_token = c.num_hidden_layers * 2 * (2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size)
    head = 2 * d * c.vocab_size
    groups, completions = args.prompts_per_step, args.prompts_per_step * args.num_generations
    new = completions * args.max_new_tokens
    sampling = groups * prompt_len * per_token + completions * head + new * (per_token + head)
    layers_forward = groups * prompt_len * per_token + new * per_token
    head_forward = new * head
    if replayed:  # the layers' backward; the head's forward and its gradient's product
        return (sampling + layers_forward + 2 * head_forward) / 1e9
    return (sampling + 2 * (layers_forward + head_forward)) / 1e9


# ------------------------------------------------------------------------------------------- driver


def run_worker(framework: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "graft.bench", "--worker", framework]
    for key in (
        "steps",
        "warmup",
        "num_generations",
        "prompts_per_step",
        "max_new_tokens",
        "lora_r",
        "device",
        "task",
        "max_turns",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "TQDM_DISABLE": "1", **GRAFT_VARIANTS.get(framework, ([], {}))[1]}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict:
    merged: dict[str, list[float]] = {}
    for r in results:
        for key, value in r.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)

    def per_s(key: str) -> float:  # the median over steps of the step's count over its time
        return statistics.median(n / s for n, s in zip(merged[key], merged["step_s"], strict=True))

    times = {k: statistics.median(merged[k]) for k in ("step_s", "rollout_s", "reward_s", "train_s")}
    common = {"peak_rss_mb": max(r["peak_rss_mb"] for r in results), "steps_measured": len(merged["step_s"])}
    if "episodes" not in merged:
        return {
            "tokens_per_s": per_s("completion_tokens"),
            **times,
            "completion_tokens": statistics.median(merged["completion_tokens"]),
            **common,
        }
    episodes = sum(merged["episodes"])
    turns = sum(t * n for t, n in zip(merged["turns_per_episode"], merged["episodes"], strict=True))
    return {
        "episodes_per_s": per_s("episodes"),
        "tokens_per_s": per_s("model_tokens"),  # the model's tokens over all turns, not the environment's
        "turns_per_episode": turns / max(episodes, 1),
        **times,
        "episodes": episodes,  # over all measured steps
        "model_tokens": statistics.median(merged["model_tokens"]),
        **common,
    }


def print_wordle(console, args: argparse.Namespace, summary: dict) -> None:
    from rich.table import Table

    steps = args.rounds * args.steps
    where = f"{os.cpu_count()} CPU cores" + ("" if args.device == "cpu" else f" + {args.device}")
    table = Table(title=f"Wordle GRPO step on {where} (medians over {steps} steps)")
    columns = ("", "episodes/s", "model tok/s", "turns/episode", "step s", "rollout s", "reward s", "train s")
    for col in (*columns, "peak RSS MB"):
        table.add_column(col, justify="right")
    for framework, s in summary.items():
        table.add_row(
            framework, f"{s['episodes_per_s']:.2f}", f"{s['tokens_per_s']:.1f}", f"{s['turns_per_episode']:.2f}",
            f"{s['step_s']:.2f}", f"{s['rollout_s']:.2f}", f"{s['reward_s']:.3f}", f"{s['train_s']:.2f}",
            f"{s['peak_rss_mb']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        "model tok/s: the model's tokens over all turns of a step's episodes (not the environment's) over the "
        "step time; turns/episode: the mean over all measured episodes"
    )
    console.print("single-turn (graft vs TRL, completion tokens/s): graft bench --task arithmetic")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graft bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--frameworks",
        help="comma-separated: graft, trl, the mixed-precision modes graft-bf16 (bf16 sampling copy + "
        "bf16 autocast training) and trl-bf16 (GRPOConfig(bf16=True)), and graft with one fast path off: "
        "graft-unpacked (no oneDNN packing), graft-noreplay (a second forward), graft-hf (transformers "
        "sampling); default graft,trl (graft with --task wordle: TRL has no multi-turn trainer)",
    )
    parser.add_argument(
        "--task",
        choices=("arithmetic", "wordle"),
        default="arithmetic",
        help="arithmetic: single-turn steps of exactly --max-new-tokens tokens, graft vs TRL; wordle: "
        "multi-turn steps, whole games against graft's environment, graft only",
    )
    parser.add_argument("--max-turns", type=int, default=6, help="--task wordle: episode.max_turns")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess runs per framework")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per run")
    parser.add_argument("--num-generations", type=int, default=8, help="G: completions (episodes) per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="prompts (games) per step")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per completion (per turn in wordle)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where both frameworks run (default cpu)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker = worker_graft if args.worker in GRAFT_VARIANTS else worker_trl
        result = worker(args)
        print(json.dumps(result))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))  # the table must not be cut in CI logs
    wordle = args.task == "wordle"
    default = "graft" if wordle else "graft,trl"
    frameworks = [f.strip() for f in (args.frameworks or default).split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in (*GRAFT_VARIANTS, "trl", "trl-bf16")]
    if unknown:
        console.print(
            f"[red]unknown --frameworks {unknown}[/red]; known: {', '.join(GRAFT_VARIANTS)}, trl, trl-bf16"
        )
        return 2
    if wordle and any(f not in GRAFT_VARIANTS for f in frameworks):
        dropped = [f for f in frameworks if f not in GRAFT_VARIANTS]
        frameworks = [f for f in frameworks if f in GRAFT_VARIANTS]
        console.print(
            f"[yellow]dropping {', '.join(dropped)}[/yellow]: TRL has no multi-turn GRPO trainer to compare "
            "with --task wordle (graft variants only)"
        )
        if not frameworks:
            console.print("[red]nothing left to run[/red]: --task wordle runs graft variants only")
            return 2
    from graft.cpu.probe import probe

    machine = probe()
    console.print(f"machine: {machine.summary()}; {os.cpu_count()} cores; device {args.device}")
    if not machine.has("bfloat16") and any(f in BF16_WORKERS for f in frameworks):
        console.print(f"[yellow]skipping {', '.join(BF16_WORKERS)}[/yellow]: {machine.missing('bfloat16')}")
        frameworks = [f for f in frameworks if f not in BF16_WORKERS]
    if any(f.startswith("trl") for f in frameworks):
        try:
            import trl  # noqa: F401
        except ImportError:
            console.print(
                "[red]TRL is not installed[/red]: pip install -e '.[bench]' (or --frameworks graft)"
            )
            return 2
    runs = f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warmup) per framework, alternating"
    if wordle:
        console.print(
            f"Wordle GRPO step (multi-turn, graft only): {args.prompts_per_step} games x G={args.num_generations} "
            f"episodes, at most {args.max_turns} turns of at most {args.max_new_tokens} new tokens, episodes end "
            f"naturally (no min_new_tokens), no SFT, LoRA r{args.lora_r} all-linear, beta=0, mu=1; {runs}"
        )
    else:
        console.print(
            f"GRPO step: {args.prompts_per_step} prompts x G={args.num_generations}, exactly "
            f"{args.max_new_tokens} new tokens, LoRA r{args.lora_r} all-linear, beta=0, mu=1; {runs}"
        )
    raw: dict[str, list[dict]] = {f: [] for f in frameworks}
    for round_index in range(args.rounds):
        for framework in frameworks:
            console.print(f"  round {round_index + 1}: {framework} ...")
            raw[framework].append(run_worker(framework, args))
    summary = {f: summarize(rs) for f, rs in raw.items()}
    if wordle:
        print_wordle(console, args, summary)
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
            result = {"task": "wordle", "settings": settings, "summary": summary, "raw": raw}
            result["machine"] = machine.to_dict()
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    from graft.config import ModelConfig, TaskConfig
    from graft.evaluation import encode_prompts
    from graft.models import load_tokenizer, resolve_model_path
    from graft.tasks import build_task

    path = resolve_model_path(ModelConfig())
    task = build_task(TaskConfig(system_prompt=SYSTEM_PROMPT))
    prompt_len = statistics.mean(
        len(p) for p in encode_prompts(load_tokenizer(path, ModelConfig()), task, task.train[:50])
    )
    gflop = step_gflop(args, round(prompt_len))
    peak = matmul_peak_gflops()

    table = Table(
        title=f"GRPO step on {os.cpu_count()} CPU cores (medians over {args.rounds * args.steps} steps)"
    )
    for col in (
        "",
        "completion tok/s",
        "step s",
        "rollout s",
        "reward s",
        "train s",
        "peak RSS MB",
        "of fp32 peak",
    ):
        table.add_column(col, justify="right")
    for framework, s in summary.items():
        s["fraction_of_peak"] = gflop / s["step_s"] / peak
        table.add_row(
            framework, f"{s['tokens_per_s']:.1f}", f"{s['step_s']:.2f}", f"{s['rollout_s']:.2f}",
            f"{s['reward_s']:.3f}", f"{s['train_s']:.2f}", f"{s['peak_rss_mb']:.0f}", f"{s['fraction_of_peak']:.1%}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"step work ~{gflop:.0f} GFLOP (matmuls, prompt {prompt_len:.0f} tokens); measured fp32 matmul peak "
        f"{peak:.0f} GFLOP/s"
    )
    replayed_gflop = step_gflop(args, round(prompt_len), replayed=True)
    for framework, rs in raw.items():
        replays = [x for r in rs for x in r.get("replayed", [])]
        if replays and all(replays):
            s = summary[framework]
            s["executed_fraction_of_peak"] = replayed_gflop / s["step_s"] / peak
            console.print(
                f"{framework} replays the rollout's forward in its update (train.replay): it executes "
                f"~{replayed_gflop:.0f} GFLOP of those, {s['executed_fraction_of_peak']:.1%} of the peak"
            )
    for variant in GRAFT_VARIANTS:
        if variant not in ("graft", "graft-bf16") and variant in summary and "graft" in summary:
            gain = summary["graft"]["tokens_per_s"] / summary[variant]["tokens_per_s"]
            console.print(
                f"graft / {variant}: {gain:.2f}x completion tokens/s (what that fast path buys here)"
            )
            summary[f"gain_over_{variant}"] = gain
    if "graft" in summary and "trl" in summary:
        ratio = summary["graft"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
        rss = summary["graft"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]
        console.print(f"[bold]graft / TRL: {ratio:.2f}x completion tokens/s, {rss:.2f}x peak RSS[/bold]")
        summary["ratio_tokens_per_s"] = ratio
    if "graft-bf16" in summary and "trl-bf16" in summary:
        ratio = summary["graft-bf16"]["tokens_per_s"] / summary["trl-bf16"]["tokens_per_s"]
        rss = summary["graft-bf16"]["peak_rss_mb"] / summary["trl-bf16"]["peak_rss_mb"]
        console.print(f"[bold]graft-bf16 / TRL-bf16 (mixed precision): {ratio:.2f}x completion tokens/s, "
                      f"{rss:.2f}x peak RSS[/bold]")  # fmt: skip
        summary["ratio_bf16_tokens_per_s"] = ratio
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"summary": summary, "raw": raw, "gflop": gflop, "peak": peak, "machine": machine.to_dict()},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
