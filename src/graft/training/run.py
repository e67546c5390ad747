"""Run setup shared by the training loops: run directory, seeding, optimizer and schedule."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from graft.config import Config, TrainConfig
from graft.training.checkpoint import checkpoint_problem, find_resumable, is_complete, list_checkpoints


class RunDirError(RuntimeError):
    pass


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint folder (step-000010) was saved at (0 for a folder renamed otherwise)."""
    try:
        return int(checkpoint.name.rpartition("-")[2])
    except ValueError:
        return 0


@dataclass
class RunDir:
    path: Path
    notes: list[str] = field(default_factory=list)  # what the run should say when it starts

    @classmethod
    def for_config(cls, cfg: Config) -> tuple[RunDir, Path | None]:
        """(the run's directory, checked but not yet created; the checkpoint to resume from, if any)."""
        if cfg.resume not in (None, "auto"):
            checkpoint = Path(cfg.resume).expanduser()
            if not is_complete(checkpoint):
                raise RunDirError(
                    f"resume={cfg.resume} is not a complete checkpoint folder (it needs trainer_state.pt); "
                    "point it at runs/<name>/checkpoints/step-NNNNNN, or use resume=auto"
                )
            if problem := checkpoint_problem(checkpoint):
                good, _ = find_resumable(checkpoint.parent)
                other = f"; the newest whole one is resume={good}" if good and good != checkpoint else ""
                raise RunDirError(f"resume={cfg.resume}: {problem}, so it cannot be resumed from{other}")
            return cls(checkpoint.parent.parent), checkpoint
        if cfg.resume == "auto" and not cfg.logging.run_name:
            raise RunDirError("resume=auto needs logging.run_name=<the run to continue>")
        name = cfg.logging.run_name or f"{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.logging.output_dir) / name
        if path.exists() and not path.is_dir():
            raise RunDirError(
                f"logging.run_name={name}: {path} is a file, not a run directory; pick another "
                "logging.run_name (or logging.output_dir)"
            )
        if cfg.resume == "auto":
            checkpoint, damaged = find_resumable(path / "checkpoints")
            if damaged and checkpoint is None:
                raise RunDirError(
                    f"resume=auto: no checkpoint of {path} can be resumed from ({'; '.join(damaged)}); "
                    "start a new run (another logging.run_name) or remove the damaged folders"
                )
            notes = [f"passed over damaged checkpoint {d}" for d in damaged]
            if damaged:
                notes.append(f"resuming from {checkpoint.name}, the newest whole checkpoint")
            return cls(path, notes), checkpoint
        if path.exists() and any(path.iterdir()):
            if not cls(path).never_saved():
                raise RunDirError(
                    f"run directory {path} already exists and is not empty; continue it with resume=auto, "
                    "pick another logging.run_name, or remove the folder"
                )
            # a run that stopped before its first checkpoint (a reward or the gate failed): nothing to
            # continue, so the same command may start it again
            return cls(
                path, [f"{path} holds a run that stopped before its first checkpoint: starting over"]
            ), None
        return cls(path), None

    def never_saved(self) -> bool:
        """A run directory from a start that failed early: its config.yaml, no checkpoint and no final/."""
        return (
            (self.path / "config.yaml").is_file()
            and not list_checkpoints(self.path / "checkpoints")
            and not (self.path / "final").exists()
        )

    def create(self, cfg: Config, resumed_step: int | None = None, changes: list[str] = ()) -> None:
        """Write config.yaml for a new run. A resumed run keeps the config.yaml it started with; when the
        resume changed settings, the config used from then on goes in config.from-step-NNNNNN.yaml."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            target = self.path / "config.yaml"
            if resumed_step is not None and target.is_file():
                target = self.path / f"config.from-step-{resumed_step + 1:06d}.yaml" if changes else None
            if target is not None:
                target.write_text(cfg.to_yaml())
        except OSError as exc:
            raise RunDirError(
                f"cannot write the run directory {self.path}: {exc.strerror}; "
                "set logging.output_dir to a writable folder"
            ) from exc

    def read_json(self, name: str) -> dict:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_json(self, name: str, data: dict) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path / name)

    def print_summary(self, display, eval_history: dict, report: Path | None = None) -> None:
        """The before / after table of the held-out evaluation, and where everything was written."""
        from graft.report import summary_rows

        rows = summary_rows(eval_history)
        if rows:
            table = Table(title="graft: run finished (held-out split)")
            for col in ("", "before", "after", "change"):
                table.add_column(col, justify="left" if not col else "right")
            for row in rows:
                table.add_row(*row)
            display.print(table)
        display.print(
            f"run directory: {self.path}  (config.yaml, metrics.jsonl, completions.jsonl, eval.json, "
            "checkpoints/, final/)" + (f"\nreport: {report}" if report else "")
        )


def setup_process(t: TrainConfig) -> None:
    """Seeds, CPU threads, deterministic kernels and the allocator, as train.* asks."""
    set_seed(t.seed, t.threads, t.deterministic)
    if t.keep_freed_memory:
        keep_freed_memory()


def set_seed(seed: int, threads: int | None = None, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable GEMMs
        torch.use_deterministic_algorithms(True)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None (another OS, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (musl has no libc.so.6 or no such symbol)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the kernel at once.

    By default glibc serves blocks above a (dynamic) threshold with mmap and trims the heap as soon as
    128 KiB at its top are free, so the (rows, hidden) activations a CPU training step allocates and frees
    hundreds of times are fresh pages each time, each page faulting and zeroed on first touch (a large
    share of a CPU step, benchmarks/NOTES.md). With blocks up to 32 MiB from the heap and
    trimming only above 1 GiB free, freed blocks are reused. Returns False where there is no glibc.
    """
    libc = glibc()
    return (
        libc is not None
        and bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    )


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop after the current step (the loop then
    checkpoints and exits). A second Ctrl-C or SIGTERM aborts at once, and so does the end of `timeout`
    seconds after the first (a step that runs away): StepAborted, without a checkpoint."""

    def __init__(self, timeout: float | None = None) -> None:
        self.requested = False
        self.timeout = timeout
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == getattr(signal, "SIGALRM", None):
            if self.requested:
                raise StepAborted(f"the step did not finish within train.stop_timeout={self.timeout:g} s")
            return
        if self.requested:
            raise StepAborted(f"a second {name}")
        self.requested = True
        grace = ""
        if self.timeout is not None and hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            grace = f", or in {self.timeout:g} s (train.stop_timeout)"
        if os.environ.get("RANK", "0") == "0":  # one line for a data-parallel run, not one per process
            print(
                f"\ngraft: {name} received: finishing this step, then saving a checkpoint (a second Ctrl-C "
                f"or SIGTERM aborts at once without one{grace})",
                flush=True,
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGALRM] if hasattr(signal, "SIGALRM") else [])
            for sig in sigs:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def step_done(self) -> None:
        """The step ended: the grace period is over, so the checkpoint that follows is not cut short."""
        if hasattr(signal, "SIGALRM") and self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc) -> None:
        if hasattr(signal, "SIGALRM") and self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepAborted(KeyboardInterrupt):
    """A stop request that could not wait for the step to end (second signal, train.stop_timeout)."""

    def __init__(self, why: str):
        super().__init__(
            f"{why}: aborted in the middle of a step; no checkpoint was written since the last one"
        )


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config):
    """AdamW with linear warmup then a constant or cosine schedule, counted in optimizer steps."""
    from transformers import get_scheduler

    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay)
    total = t.max_steps * cfg.grpo.num_iterations * cfg.grpo.num_minibatches
    name = "cosine" if t.lr_scheduler == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total)
    return optimizer, scheduler
