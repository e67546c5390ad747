"""The only place that writes metrics: metrics.jsonl (always) and the live console display."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of crashing the writer
    return value


class MetricsWriter:
    """Appends one JSON object per line; flushed every line so a crashed run keeps its history."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        """keep_until_step: on resume, drop the records of steps after the checkpoint (they are redone)."""
        self.path = path
        if keep_until_step is not None and path.is_file():
            kept = [
                line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until_step
            ]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._file.close()


# Metrics shown on the progress line, with their short labels.
_SHOWN = (
    ("reward/mean", "reward"),
    ("accuracy", "acc"),
    ("kl", "kl"),
    ("completion_length/mean", "len"),
    ("tokens_per_s", "tok/s"),
    ("eval/accuracy", "eval acc"),
)


def summary_line(metrics: dict[str, Any]) -> str:
    parts = []
    for key, label in _SHOWN:
        if metrics.get(key) is not None:
            value = _jsonable(metrics[key])
            parts.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
    return "  ".join(parts)


class ProgressDisplay:
    """A live bar with ETA on a terminal; one plain line per step otherwise (CI logs, pipes)."""

    def __init__(self, total_steps: int, mode: str = "auto", console: Console | None = None):
        self.console = console or Console(soft_wrap=True)
        self.total = total_steps
        self.use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self._start = time.perf_counter()
        self._done_before = 0
        self._last_eval: float | None = None
        self._progress: Progress | None = None
        if self.use_bar:
            self._progress = Progress(
                TextColumn("[bold]GRPO"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, summary="")

    def start(self, done_steps: int = 0) -> None:
        """Start the clock (and the live bar): the ETA counts from the first step, not from model loading.
        done_steps: steps a resumed run already has."""
        self._start = time.perf_counter()
        self._done_before = done_steps
        if self._progress is not None:
            self._progress.update(self._task, completed=done_steps)
            self._progress.start()

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if metrics.get("eval/accuracy") is not None:
            self._last_eval = metrics["eval/accuracy"]
        shown = dict(metrics)
        shown.setdefault("eval/accuracy", self._last_eval)
        line = summary_line(shown)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, summary=line)
        else:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / max(step - self._done_before, 1) * (self.total - step)
            self.console.print(
                f"step {step}/{self.total}  {line}  [{elapsed:.0f}s elapsed, eta {eta:.0f}s]", soft_wrap=True
            )
            self.console.file.flush()  # pipes and CI logs are block-buffered: show each step as it ends

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
