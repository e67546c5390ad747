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
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from graft.config import flatten


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
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------- sinks


class Sink:
    """A metrics destination. The base class does nothing, so the loop never asks which trackers are on."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    def __init__(self, run_dir: Path, project: str, mode: str, config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), mode=mode, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioSink(Sink):
    def __init__(self, run_dir: Path, project: str, config: dict):
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))  # read when trackio is first imported
        import trackio

        self.trackio = trackio
        trackio.init(
            project=project, name=run_dir.name, config=config, auto_log_cpu=False, auto_log_gpu=False
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


class MlflowSink(Sink):
    def __init__(self, run_dir: Path, project: str, uri: str | None, config: dict):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store needs no server
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri or (run_dir / "mlruns").absolute().as_uri())
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


# which package each tracker needs, for a clear error before the run starts
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def make_sink(name: str, run_dir: Path, cfg) -> Sink:
    config = cfg.model_dump(mode="json")
    log = cfg.logging
    if name == "tensorboard":
        return TensorBoardSink(run_dir)
    if name == "wandb":
        return WandbSink(run_dir, log.project, log.wandb_mode, config)
    if name == "trackio":
        return TrackioSink(run_dir, log.project, config)
    if name == "mlflow":
        return MlflowSink(run_dir, log.project, log.mlflow_uri, config)
    return Sink()  # "jsonl": metrics.jsonl is always written


class Tracker:
    """metrics.jsonl plus every configured tracker; the completion log beside them."""

    def __init__(self, run_dir: Path, cfg, keep_until_step: int | None = None):
        self.jsonl = MetricsWriter(run_dir / "metrics.jsonl", keep_until_step)
        self.completions = MetricsWriter(run_dir / "completions.jsonl", keep_until_step)
        self.sinks = [make_sink(name, run_dir, cfg) for name in dict.fromkeys(cfg.logging.report_to)]

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        if not self.sinks:
            return
        values = {k: v.item() if hasattr(v, "item") else v for k, v in record.items() if k != "step"}
        numeric = {
            k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }  # fmt: skip
        for sink in self.sinks:
            sink.log(int(record["step"]), numeric)

    def write_completions(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.completions.write(row)

    def close(self) -> None:
        self.jsonl.close()
        self.completions.close()
        for sink in self.sinks:
            sink.close()


# ------------------------------------------------------------------------------------------- completions


def read_completions(
    path: Path, step: int | None = None, min_reward: float | None = None, max_reward: float | None = None
) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        r
        for r in rows
        if (step is None or r["step"] == step)
        and (min_reward is None or r["reward"] >= min_reward)
        and (max_reward is None or r["reward"] <= max_reward)
    ]


def render_completions(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, show_lines=True)
    for col in ("step", "prompt", "completion", "answer", "reward", "advantage"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(str(row["step"]), escape(row["prompt"]), escape(row["completion"][:300]), escape(row["answer"]),
                      f"{row['reward']:.2f}", f"{row['advantage']:+.2f}")  # fmt: skip
    return table


# ------------------------------------------------------------------------------------------- console

# Metrics shown on the progress line, with their short labels.
_SHOWN = (
    ("reward/mean", "reward"),
    ("accuracy", "acc"),
    ("kl", "kl"),
    ("completion_length/mean", "len"),
    ("tokens_per_s", "tok/s"),
    ("eval/accuracy", "eval acc"),
    ("sft/loss", "loss"),
)


def summary_line(metrics: dict[str, Any]) -> str:
    parts = []
    for key, label in _SHOWN:
        if metrics.get(key) is not None:
            value = _jsonable(metrics[key])
            if value == "nan":  # every value excluded (rewards that failed or gave None): no mean to show
                value = "n/a"
            parts.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
    return "  ".join(parts)


def progress_style(mode: str, console: Console, widgets: bool | None = None) -> str:
    """'bar' or 'lines' for logging.progress `mode` on this console. A notebook has no terminal, but rich
    draws a live bar there through an ipywidgets Output (and without ipywidgets shows only a warning), so a
    notebook gets the bar when ipywidgets can be imported and one line per step when not, even if 'bar' was
    asked. Elsewhere: 'auto' = the bar on a terminal, lines in pipes and CI logs.
    widgets: whether ipywidgets is importable (default: look it up)."""
    if mode == "lines":
        return "lines"
    if console.is_jupyter:
        if widgets is None:
            import importlib.util

            widgets = importlib.util.find_spec("ipywidgets") is not None
        return "bar" if widgets else "lines"
    return "bar" if mode == "bar" or sys.stdout.isatty() else "lines"


class ProgressDisplay:
    """A live bar with ETA on a terminal (or in a notebook with ipywidgets); one plain line per step
    otherwise (CI logs, pipes): see progress_style."""

    def __init__(
        self,
        total_steps: int,
        mode: str = "auto",
        console: Console | None = None,
        label: str = "GRPO",
        budget_s: float | None = None,  # train.max_minutes: the ETA is at most what is left of it
    ):
        self.console = console or Console(soft_wrap=True)
        self.total = total_steps
        self.budget_s = budget_s
        self.use_bar = progress_style(mode, self.console) == "bar"
        self._start = time.perf_counter()
        self._done_before, self._spent_before = 0, 0.0
        self._last_eval: float | None = None
        self._progress: Progress | None = None
        if self.use_bar:
            self._progress = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, summary="")

    def start(self, done_steps: int = 0, spent_s: float = 0.0) -> None:
        """Start the clock (and the live bar): the ETA counts from the first step, not from model loading.
        done_steps: steps a resumed run already has; spent_s: the part of the time budget they used."""
        self._start = time.perf_counter()
        self._done_before = done_steps
        self._spent_before = spent_s
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
            if self.budget_s is not None:
                eta = min(eta, max(self.budget_s - self._spent_before - elapsed, 0.0))
            self.console.print(
                f"step {step}/{self.total}  {line}  [{elapsed:.0f}s elapsed, eta {eta:.0f}s]", soft_wrap=True
            )
            self.console.file.flush()  # pipes and CI logs are block-buffered: show each step as it ends

    def completions_table(self, step: int, rows: list[dict[str, Any]], n: int = 4) -> None:
        """The best and the worst completions of a step, side by side with their scores."""
        ranked = sorted(rows, key=lambda row: row["reward"], reverse=True)
        shown = ranked[: n // 2] + ranked[-(n - n // 2) :] if len(ranked) > n else ranked
        self.print(render_completions(shown, title=f"completions at step {step} (best and worst)"))

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
