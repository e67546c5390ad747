"""The commands that use a trained model: graft sft | eval | generate | chat | compare | export | report.
Each takes a run directory (--run runs/<name>) or a recipe + overrides, and prompts the model through the
chat template and system prompt the run trained with. The work of eval, generate and export is in plain
functions (evaluate_target, generate_replies, export_target) that graft.api calls too; the cmd_* functions
only parse, call them and print."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graft.config import ConfigError, load_config

if TYPE_CHECKING:
    from graft.inference import Target


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (when not using --run)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.max_new_tokens=128")
    parser.add_argument("--run", help="a run directory (runs/<name>): its config, and final/ or a checkpoint")
    parser.add_argument("--checkpoint", help="with --run: a checkpoint name (step-000010) instead of final/")


def _target(args):
    from graft.inference import resolve_target

    return resolve_target(args.run, args.config, args.overrides, args.checkpoint)


def _judge(task, cfg):
    """(correctness function, runtime to close): accuracy through the reward runtime, as in training."""
    from graft.rewards.runtime import RewardRuntime

    name = task.default_rewards[0]
    runtime = RewardRuntime([name], cfg.rewards.timeout, 1)
    return runtime.scorer(name), runtime


def _conversation(system: str | None, prompt: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(f"--prompts {path}: no such file (one prompt per line, or JSONL with 'prompt')")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ConfigError(f"{path}:{number}: a JSON line needs a 'prompt' key ({exc})") from exc
            else:
                prompts.append(line.strip())
    return prompts


# ----------------------------------------------------------------------------------------------- sft


def cmd_sft(args, console: Console) -> int:
    from graft.tasks import build_task
    from graft.training.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    if cfg.resume is not None:
        raise ConfigError("graft sft does not resume (a warm-up is short): run it again")
    if not cfg.logging.run_name:
        cfg.logging.run_name = f"{cfg.task.name}-sft-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.logging.output_dir) / cfg.logging.run_name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; pick another logging.run_name")
    final = run_sft(cfg, build_task(cfg.task), out, console)
    console.print(f"SFT adapter: {final}\nGRPO from it:  graft train <recipe> model.adapter={final}")
    return 0


# ---------------------------------------------------------------------------------------------- eval


def evaluate_target(
    target: Target,
    *,
    base: bool = False,
    split: str = "eval",
    num: int | None = None,
    samples: int = 0,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    output: str | Path | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """What graft eval measures, as the dict `--json` prints and `--output` writes (also written to
    `output` when given). loaded: the target's (model, tokenizer) when the caller already holds them."""
    import torch

    from graft.evaluation import evaluate
    from graft.inference import load_target
    from graft.models import stop_token_ids
    from graft.tasks import build_task

    cfg = target.cfg
    task = build_task(cfg.task)
    model, tokenizer = loaded or load_target(target, with_weights=not base)
    fit_to_model(cfg, task, model, tokenizer)
    # the held-out split goes in whole (problems=None) so that its unseen phrasings are measured too
    problems = task.train[:num] if split == "train" else None
    correctness, runtime = _judge(task, cfg)
    start = time.perf_counter()
    try:
        result = evaluate(
            model, tokenizer, task, correctness, problems=problems, num_problems=num,
            max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens or cfg.generation.max_new_tokens,
            stop_ids=stop_token_ids(model, tokenizer), batch_size=cfg.eval.batch_size,
            num_samples=samples, temperature=temperature or cfg.eval.temperature,
            generator=torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.train.seed),
        )  # fmt: skip
    finally:
        runtime.close()
    label = f"{target.label}{' (base)' if base else ''}"
    data = {"model": label, "task": cfg.task.name, "split": split, "seconds": time.perf_counter() - start,
            **result.to_dict()}  # fmt: skip
    if output:
        Path(output).write_text(json.dumps(data, indent=2))
    return data


def fit_to_model(cfg, task, model, tokenizer) -> None:
    """task.long_prompts for a loaded model, as graft train applies it (graft.checks.prompts)."""
    from graft.checks.prompts import context_length, fit_prompts

    fit = fit_prompts(cfg, task, tokenizer, context_length(getattr(model, "config", None)))
    if fit.problems:
        raise ConfigError("\n".join(fit.problems))


def eval_table(data: dict[str, Any]) -> Table:
    """graft eval's table of an evaluate_target result."""
    table = Table(
        title=f"graft eval: {data['model']} on {data['task']} ({data['split']}, {data['num_problems']} problems)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("greedy accuracy", data["accuracy"]), ("strict accuracy", data["accuracy_strict"]),
            ("unseen phrasing accuracy", data.get("unseen_accuracy")),
            ("format compliance", data["format_compliance"])]  # fmt: skip
    rows += [(f"greedy accuracy, {kind}", v) for kind, v in (data.get("accuracy_by_kind") or {}).items()]
    rows += [(f"pass@{k}", v) for k, v in data["pass_at_k"].items()]
    rows += [(f"maj@{k}", v) for k, v in data["maj_at_k"].items()]
    rows += [("mean length", data["mean_length"]), ("p95 length", data["p95_length"]),
             ("truncation", data["truncated_fraction"])]  # fmt: skip
    for name, value in rows:
        if value is not None:
            table.add_row(name, f"{value:.1f}" if "length" in name else f"{value:.3f}")
    return table


def cmd_eval(args, console: Console) -> int:
    data = evaluate_target(
        _target(args), base=args.base, split=args.split, num=args.num, samples=args.samples,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, output=args.output,
    )  # fmt: skip
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    console.print(eval_table(data))
    if args.output:
        console.print(f"results: {args.output}")
    return 0


# ------------------------------------------------------------------------------- generate / chat / compare


def generate_replies(
    target: Target,
    prompts: list[str],
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    loaded: tuple[Any, Any] | None = None,
) -> list[str]:
    """One reply per prompt, each asked as a user turn after the run's system prompt, through its chat
    template (what graft generate prints). loaded: the target's (model, tokenizer) when already held."""
    from graft.inference import generate, load_target
    from graft.tasks import system_prompt

    model, tokenizer = loaded or load_target(target)
    system = system_prompt(target.cfg.task)
    return generate(model, tokenizer, [_conversation(system, p) for p in prompts],
                    max_new_tokens=max_new_tokens or target.cfg.generation.max_new_tokens,
                    temperature=temperature, seed=seed)  # fmt: skip


def cmd_generate(args, console: Console) -> int:
    prompts = _read_prompts(args)
    if not prompts:
        raise ConfigError("nothing to generate from: pass --prompt TEXT (repeatable) or --prompts FILE")
    replies = generate_replies(_target(args), prompts, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed)  # fmt: skip
    for prompt, reply in zip(prompts, replies, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": reply}))
        else:
            console.print(f"[bold]> {escape(prompt)}[/bold]\n{escape(reply)}\n")
    return 0


def cmd_chat(args, console: Console) -> int:
    """Turns from stdin (a terminal or a pipe); /reset forgets the conversation, /exit or EOF ends it."""
    from graft.inference import generate, load_target
    from graft.tasks import system_prompt

    target = _target(args)
    model, tokenizer = load_target(target)
    system = system_prompt(target.cfg.task)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"chatting with {target.label} (system prompt: {system!r}); /reset, /exit")
    max_new = args.max_new_tokens or target.cfg.generation.max_new_tokens
    turn = 0
    while True:
        line = console.input("[bold]you>[/bold] ") if interactive else sys.stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            console.print("[dim](conversation reset)[/dim]")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [history], max_new_tokens=max_new, temperature=args.temperature,
                         seed=args.seed + turn)[0]  # fmt: skip
        history.append({"role": "assistant", "content": reply})
        turn += 1
        console.print(f"[bold cyan]assistant>[/bold cyan] {escape(reply)}", highlight=False)
    return 0


def cmd_compare(args, console: Console) -> int:
    """The model before the run and after it, on the same prompts: held-out problems (scored) by default."""
    from graft.inference import generate, load_target
    from graft.tasks import Problem, build_task, system_prompt

    target = _target(args)
    if target.weights is None:
        raise ConfigError("compare needs a trained model: pass --run runs/<name>")
    cfg = target.cfg
    prompts = _read_prompts(args)
    if prompts:
        task, problems = None, [Problem(p, "") for p in prompts]
    else:
        task = build_task(cfg.task)
        problems = task.eval[: args.num]
    system = task.system_prompt if task else system_prompt(cfg.task)
    conversations = [_conversation(system, p.prompt) for p in problems]
    decode = dict(max_new_tokens=args.max_new_tokens or cfg.generation.max_new_tokens,
                  temperature=args.temperature, seed=args.seed)  # fmt: skip
    tuned_model, tokenizer = load_target(target)
    tuned = generate(tuned_model, tokenizer, conversations, **decode)
    if target.is_adapter:  # the same weights with the run's adapter switched off
        base = generate(tuned_model, tokenizer, conversations, use_adapter=False, **decode)
    else:
        del tuned_model
        base_model, _ = load_target(target, with_weights=False)
        base = generate(base_model, tokenizer, conversations, **decode)
    marks = [[""] * len(problems), [""] * len(problems)]
    if task is not None:
        correctness, runtime = _judge(task, cfg)
        try:
            msgs, columns = task.reward_inputs(problems)
            for i, texts in enumerate((base, tuned)):
                marks[i] = ["✓ " if s == 1.0 else "✗ " for s in correctness(msgs, texts, **columns)]
        finally:
            runtime.close()
    table = Table(title=f"graft compare: before vs after {target.label}", show_lines=True)
    table.add_column("prompt", ratio=2)
    if task is not None:
        table.add_column("answer")
    table.add_column("before (start of the run)", ratio=3)
    table.add_column("after (tuned)", ratio=3)
    for j, p in enumerate(problems):
        cells = [escape(p.prompt)] + ([escape(p.answer)] if task else [])
        table.add_row(*cells, marks[0][j] + escape(base[j]), marks[1][j] + escape(tuned[j]))
    console.print(table)
    if task is not None:
        before, after = (sum(m == "✓ " for m in ms) for ms in marks)
        console.print(f"correct: before {before}/{len(problems)}, after {after}/{len(problems)}")
    return 0


# -------------------------------------------------------------------------------------- export / report


def export_target(
    target: Target,
    to: str | Path,
    *,
    adapter: bool = False,
    merged: bool = False,
    gguf: bool = False,
    gguf_dtype: str = "f16",
    parity: bool = True,
    parity_tol: float | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    force: bool = False,
    say: Callable[[str], object] = print,
) -> Path:
    """What graft export writes into `to` (returned): adapter/ when asked, merged/ (asked, for gguf, or
    when nothing else is), a GGUF file, then a hub push. say: where each finished piece is reported."""
    from graft import exporter as export

    if target.weights is None:
        raise ConfigError("export needs a trained model: pass --run runs/<name>")
    out = Path(to)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; choose another --to or pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    merged = merged or gguf or not adapter  # merged is the default, and GGUF is made from it
    pushed_folder = None
    if adapter:
        path = export.export_adapter(target, out / "adapter")
        say(f"adapter: {path}")
        pushed_folder = path
    if merged:
        report = export.export_merged(target, out / "merged", parity=parity, tolerance=parity_tol)
        say(f"merged model: {report['path']} ({report['dtype']})")
        if "parity_max_abs_logprob_diff" in report:
            say(f"parity: max |log-prob difference| merged vs adapter = "
                f"{report['parity_max_abs_logprob_diff']:.2e} nats over {report['parity_tokens']} "
                f"tokens (tolerance {report['parity_tolerance']:g})")  # fmt: skip
        pushed_folder = out / "merged"
    if gguf:
        written = export.export_gguf(out / "merged", out / f"{target.label}-{gguf_dtype}.gguf", gguf_dtype)
        say(f"gguf: {written['path']} (read back: max |log-prob difference| "
            f"{written['reload_max_abs_logprob_diff']:.2e}, tolerance {written['tolerance']})")  # fmt: skip
    if push_to_hub:
        url = export.push_to_hub(pushed_folder, push_to_hub, private=private)
        say(f"pushed {pushed_folder} to {url}")
    return out


def cmd_export(args, console: Console) -> int:
    export_target(
        _target(args), args.to, adapter=args.adapter, merged=args.merged, gguf=args.gguf,
        gguf_dtype=args.gguf_dtype, parity=not args.no_parity, parity_tol=args.parity_tol,
        push_to_hub=args.push_to_hub, private=args.private, force=args.force, say=console.print,
    )  # fmt: skip
    return 0


def cmd_report(args, console: Console) -> int:
    from graft.report import write_report

    run = Path(args.run)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a directory; pass a run directory such as runs/<name>")
    if not (run / "config.yaml").is_file():
        raise ConfigError(
            f"'{run}' is not a graft run directory (no config.yaml), so no report is written there; "
            "pass runs/<name>"
        )
    console.print(f"report: {write_report(run)}")
    return 0


def count(minimum: int):
    """argparse type: an integer of at least `minimum` (`--samples -3` is refused by the parser)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (temperatures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value


def register(sub) -> None:
    """Add these commands to the `graft` parser."""
    sft = sub.add_parser("sft", help="supervised warm-up on examples of the wanted format (then graft train)")
    sft.add_argument("config", nargs="?", help="YAML recipe (its sft section, model, lora and task)")
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.max_steps=50")
    sft.set_defaults(func=cmd_sft, split_config=True)

    ev = sub.add_parser(
        "eval", help="accuracy, pass@k, maj@k, format and lengths of a model or run on a task"
    )
    add_target_arguments(ev)
    ev.add_argument("--base", action="store_true", help="with --run: the model before the run's training")
    ev.add_argument("--split", choices=["eval", "train"], default="eval", help="task split (default: eval)")
    ev.add_argument("--num", type=count(1), help="only the first N problems")
    ev.add_argument("--samples", type=count(0), default=0, help="samples per problem for pass@k / maj@k")
    ev.add_argument(
        "--temperature", type=non_negative, help="sampling temperature for --samples (default eval's)"
    )
    ev.add_argument("--max-new-tokens", type=count(1), help="completion length limit")
    ev.add_argument("--output", help="write the results as JSON to this file")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=cmd_eval, split_config=True)

    for name, func, help_text in (
        ("generate", cmd_generate, "complete prompts with the run's chat template and system prompt"),
        ("chat", cmd_chat, "talk to a model or run (stdin: a terminal or a pipe)"),
        ("compare", cmd_compare, "the model before vs after a run, side by side on the same prompts"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_target_arguments(p)
        if name != "chat":
            p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
            p.add_argument("--prompts", help="file: one prompt per line, or JSONL with a 'prompt' key")
        if name == "compare":
            p.add_argument(
                "--num", type=count(1), default=8, help="held-out problems when no prompts are given"
            )
        if name == "generate":
            p.add_argument("--json", action="store_true", help="JSON lines {prompt, completion}")
        p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy (default)")
        p.add_argument("--max-new-tokens", type=count(1), help="reply length limit (default: the run's)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        p.set_defaults(func=func, split_config=True)

    ex = sub.add_parser("export", help="adapter, merged model (parity-checked), GGUF, hub push")
    add_target_arguments(ex)
    ex.add_argument("--to", required=True, help="output folder (gets adapter/, merged/, *.gguf)")
    ex.add_argument("--adapter", action="store_true", help="the LoRA adapter folder")
    ex.add_argument("--merged", action="store_true", help="a merged full model (the default)")
    ex.add_argument("--gguf", action="store_true", help="also a GGUF file for llama.cpp (Llama-family)")
    ex.add_argument("--gguf-dtype", choices=["f16", "bf16", "f32"], default="f16", help="GGUF weight type")
    ex.add_argument("--no-parity", action="store_true", help="skip the merged-vs-adapter check")
    ex.add_argument("--parity-tol", type=float, help="max |log-prob difference| accepted (nats)")
    ex.add_argument("--push-to-hub", metavar="REPO", help="upload the merged (else adapter) folder")
    ex.add_argument("--private", action="store_true", help="create the hub repo private")
    ex.add_argument("--force", action="store_true", help="replace a non-empty --to folder")
    ex.set_defaults(func=cmd_export, split_config=True)

    rep = sub.add_parser("report", help="(re)write runs/<name>/report.html")
    rep.add_argument("run", help="run directory")
    rep.set_defaults(func=cmd_report)
