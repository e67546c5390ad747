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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from graft.config import Config, TrainConfig
from graft.tasks import Problem, Task
from graft.training.checkpoint import is_complete, latest_checkpoint


class RunDirError(RuntimeError):
    pass


@dataclass
class RunDir:
    path: Path

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
            return cls(checkpoint.parent.parent), checkpoint
        if cfg.resume == "auto" and not cfg.logging.run_name:
            raise RunDirError("resume=auto needs logging.run_name=<the run to continue>")
        name = cfg.logging.run_name or f"{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.logging.output_dir) / name
        if cfg.resume == "auto":
            return cls(path), latest_checkpoint(path / "checkpoints")
        if path.exists() and any(path.iterdir()):
            raise RunDirError(
                f"run directory {path} already exists and is not empty; continue it with resume=auto, "
                "pick another logging.run_name, or remove the folder"
            )
        return cls(path), None

    def create(self, cfg: Config) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(cfg.to_yaml())
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
    checkpoints and exits); a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(
            f"\ngraft: {name} received: finishing this step, then saving a checkpoint (Ctrl-C again aborts)"
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config):
    """AdamW with linear warmup then a constant or cosine schedule, counted in optimizer steps."""
    from transformers import get_scheduler

    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay)
    total = t.max_steps * cfg.grpo.num_iterations * cfg.grpo.num_minibatches
    name = "cosine" if t.lr_scheduler == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total)
    return optimizer, scheduler


class PromptOrder:
    """Training problems in a seeded shuffled order, reshuffled every epoch; its state goes in checkpoints."""

    def __init__(self, task: Task, seed: int):
        self.task = task
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.task.train)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def next_problems(self, n: int) -> list[Problem]:
        return [self.task.train[i] for i in self.take(n)]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled()
