"""`graft train | sft | eval | generate | chat | compare | export | report | validate | config | completions |
doctor | bench`: the command line."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graft.commands import count
from graft.config import ConfigError, describe, load_config
from graft.quiet import quiet_libraries


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from graft.api import train

    cfg = load_config(args.config, args.overrides)
    if args.nproc > 1:  # check once here, then start the processes (each checks again, cheaply)
        from graft.training.distributed import launched_world
        from graft.training.launch import launch
        from graft.validate import validate_or_raise

        if launched_world() > 1:
            raise ConfigError("--nproc inside a launched process: use either --nproc or torchrun/accelerate")
        validate_or_raise(cfg, world=args.nproc)
        console.print(f"graft: starting {args.nproc} training processes (torchrun, data-parallel)")
        rest = [*([args.config] if args.config else []), *args.overrides]
        return launch(args.nproc, ["train", *rest], cfg.train.stop_timeout)
    train(cfg, console=console)
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    cfg = load_config(args.config, args.overrides)
    from graft.validate import plan_for_gpu, validate_or_raise

    if args.gpu_memory is not None:  # a plan for another machine: only the memory question applies
        _, verdict = plan_for_gpu(cfg, args.gpu_memory, world=args.nproc)
        console.print(("[green]" if verdict.startswith("fits") else "[red]") + escape(verdict) + "[/]")
        console.print("[dim](an estimate from the model's shape, until measured on that GPU)[/dim]")
        return 0 if verdict.startswith("fits") else 1
    checked = validate_or_raise(cfg, world=args.nproc)
    memory = checked.memory
    console.print("[green]config OK[/green]" + (f"; memory estimate: {memory.describe()}" if memory else ""))
    for line in checked.paths.report_lines() if checked.paths else []:
        console.print(escape(line))
    for note in checked.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    if checked.resume_changes:
        console.print("resuming changes (recorded by the run): " + escape("; ".join(checked.resume_changes)))
    return 0


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    from graft.doctor import print_report, report

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    data = report(cfg, label=args.config or ("defaults + overrides" if args.overrides else "defaults"))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_report(console, data)
    return 0


def cmd_completions(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from graft.tracking import read_completions, render_completions

    path = Path(args.run) / "completions.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass a run directory such as runs/<name>")
    rows = read_completions(path, step=args.step, min_reward=args.min_reward, max_reward=args.max_reward)
    console.print(render_completions(rows[: args.limit], title=f"{len(rows)} completion(s) in {args.run}"))
    return 0


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    if args.keys:
        table = Table(title="graft config keys")
        for col in ("key", "default", "help"):
            table.add_column(col)
        for key, default, help_text in describe():
            table.add_row(key, default, help_text)
        console.print(table)
        return 0
    console.print(load_config(args.config, args.overrides).to_yaml(), end="", markup=False, highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft",
        description="GRPO fine-tuning for reasoning LLMs",
        epilog="--debug (anywhere on the line): show the Python traceback behind an error",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run GRPO training from a YAML recipe plus key=value overrides")
    train.add_argument(
        "config", nargs="?", help="YAML recipe, e.g. configs/arithmetic.yaml (default: built-ins)"
    )
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.beta=0.04 train.max_steps=3")
    train.add_argument(
        "--nproc",
        type=count(1),
        default=1,
        help="data-parallel processes on this machine (torchrun; one per GPU, or CPU processes sharing "
        "the cores); for several machines run torchrun / accelerate launch -m graft train on each",
    )
    train.set_defaults(func=cmd_train)

    validate = sub.add_parser(
        "validate", help="check a recipe (config, data, model, paths, disk, memory) alone"
    )
    validate.add_argument("config", nargs="?", help="YAML recipe")
    validate.add_argument("overrides", nargs="*", help="dotted overrides")
    validate.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="instead: estimate whether the recipe fits a CUDA GPU with this many GiB (exit 1 if not)",
    )
    validate.add_argument(
        "--nproc",
        type=count(1),
        default=1,
        help="check the recipe for this many processes (graft train --nproc N; per-GPU memory with "
        "--gpu-memory, sharded by train.fsdp)",
    )
    validate.set_defaults(func=cmd_validate)

    doctor = sub.add_parser(
        "doctor",
        help="environment report: versions, devices, CPU features, the fast paths a recipe takes here",
    )
    doctor.add_argument("config", nargs="?", help="YAML recipe whose paths to explain (default: built-ins)")
    doctor.add_argument("overrides", nargs="*", help="dotted overrides")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)

    comp = sub.add_parser("completions", help="browse a run's completion log, filtered by step and reward")
    comp.add_argument("run", help="run directory, e.g. runs/arithmetic-20261123-120000")
    comp.add_argument("--step", type=int, help="only this step")
    comp.add_argument("--min-reward", type=float, help="only completions scoring at least this")
    comp.add_argument("--max-reward", type=float, help="only completions scoring at most this")
    comp.add_argument("--limit", type=count(1), default=20, help="rows to show (default 20)")
    comp.set_defaults(func=cmd_completions)

    config = sub.add_parser("config", help="print the resolved config, or every key with its help (--keys)")
    config.add_argument("config", nargs="?", help="YAML recipe")
    config.add_argument("overrides", nargs="*", help="dotted overrides")
    config.add_argument("--keys", action="store_true", help="list every config key, its default and help")
    config.set_defaults(func=cmd_config)
    from graft.commands import register
    from graft.play import register as register_play

    register(sub)
    register_play(sub)
    # listed for --help; its options are parsed by graft.bench itself (see main)
    sub.add_parser(
        "bench", help="GRPO step benchmark, graft vs TRL side by side (graft bench --help)", add_help=False
    )
    return parser


def _split_config_arg(args: argparse.Namespace) -> None:
    # `graft train grpo.beta=0.1` (no recipe): the first positional is an override, not a file
    if args.config is not None and "=" in args.config and not os.path.exists(args.config):
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from graft.bench import main as bench_main

        return bench_main(argv[1:])
    # --debug anywhere (or GRAFT_DEBUG=1): errors show their Python traceback as well as the message
    debug = "--debug" in argv or os.environ.get("GRAFT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides after an option (`train recipe.yaml --nproc 2 train.max_steps=3`): argparse stops the
    # positional list at the option, so the rest arrive here
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("train", "validate", "config", "doctor") or getattr(args, "split_config", False):
        _split_config_arg(args)
    if args.command not in ("config", "doctor", "completions", "report"):
        quiet_libraries()
    # soft_wrap: long paths and messages stay on one line (copyable), the terminal wraps them if it must
    # in a data-parallel run only the first process prints (graft.training.distributed); errors: all
    quiet_rank = os.environ.get("RANK", "0") != "0"
    console = Console(soft_wrap=True, file=io.StringIO() if quiet_rank else None)
    err = Console(stderr=True, soft_wrap=True)
    from graft.exporter import ExportError
    from graft.models import ModelError
    from graft.rewards.runtime import RewardError
    from graft.training.checkpoint import CheckpointError
    from graft.training.gate import GateError
    from graft.training.loop import TrainingError, TrainingInterrupted
    from graft.training.run import RunDirError, StepAborted

    try:
        return args.func(args, console)
    except (ConfigError, ModelError, RunDirError) as exc:
        _traceback(err, debug)
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        return 2
    except (TrainingError, CheckpointError, RewardError, GateError, ExportError) as exc:
        _traceback(err, debug)
        err.print(f"[bold red]training stopped:[/bold red] {escape(str(exc))}", highlight=False)
        return 1
    except TrainingInterrupted as exc:
        console.print(f"[yellow]{escape(str(exc))}[/yellow]\n" + escape(resume_hint(args, exc.run_dir)))
        return 130
    except StepAborted as exc:
        _traceback(err, debug)
        err.print(f"[yellow]interrupted[/yellow]: {escape(str(exc))}")
        return 130
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow] (no checkpoint was written since the last one)")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns the unforeseen into a message
        if debug:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(unexpected_message(exc))}", highlight=False)
        return 1


def unexpected_message(exc: BaseException) -> str:
    """One paragraph for an error no check foresaw: what it was, where a file or disk is involved, and how
    to see the traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        what = f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
        return f"{what} ({type(exc).__name__}); check the path, its permissions and free disk space"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0][:300] + (" ..." if len(lines) > 1 or len(lines[0]) > 300 else "") if lines else ""
    return (
        f"{type(exc).__name__}: {text}. graft did not expect this; run the same command with --debug "
        "for the traceback (and please report it)"
    )


def _traceback(err: Console, debug: bool) -> None:
    if debug:
        import traceback

        err.print(escape(traceback.format_exc()), highlight=False)


def resume_hint(args: argparse.Namespace, run_dir) -> str:
    """The command that continues the run: the same recipe and overrides, plus resume=auto."""
    keep = [
        o for o in args.overrides if not o.startswith(("resume=", "logging.run_name=", "logging.output_dir="))
    ]
    world = int(os.environ.get("WORLD_SIZE", "1"))  # a data-parallel run resumes with as many processes
    launch = ["graft train"] + ([f"--nproc {world}"] if world > 1 else [])
    parts = [*launch, *([args.config] if args.config else []), *keep, "resume=auto",
             f"logging.output_dir={run_dir.parent}", f"logging.run_name={run_dir.name}"]  # fmt: skip
    return "resume with:\n  " + " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
