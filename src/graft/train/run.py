"""Run setup shared by the training loops: run directory, seeding, optimizer and schedule."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from graft.config import Config


class RunDirError(RuntimeError):
    pass


@dataclass
class RunDir:
    path: Path

    @classmethod
    def for_config(cls, cfg: Config) -> RunDir:
        """The run's directory, checked but not yet created (a run that fails to start leaves nothing)."""
        name = cfg.logging.run_name or f"{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.logging.output_dir) / name
        if path.exists() and any(path.iterdir()):
            raise RunDirError(
                f"run directory {path} already exists and is not empty; pick another logging.run_name "
                "or remove the folder"
            )
        return cls(path)

    def create(self, cfg: Config) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(cfg.to_yaml())
        except OSError as exc:
            raise RunDirError(
                f"cannot write the run directory {self.path}: {exc.strerror}; "
                "set logging.output_dir to a writable folder"
            ) from exc

    def write_json(self, name: str, data: dict) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path / name)

    def print_summary(self, display, eval_history: dict) -> None:
        table = Table(title="graft: run finished")
        table.add_column("")
        table.add_column("held-out accuracy", justify="right")
        table.add_column("mean length", justify="right")
        table.add_column("truncated", justify="right")
        for tag, result in eval_history.items():
            table.add_row(
                f"{tag} (step {result['step']})",
                f"{result['accuracy']:.3f}",
                f"{result['mean_length']:.1f}",
                f"{result['truncated_fraction']:.2f}",
            )
        display.print(table)
        display.print(
            f"run directory: {self.path}  (config.yaml, metrics.jsonl, eval.json, checkpoints/, final/)"
        )


def set_seed(seed: int, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads or os.cpu_count() or 1)


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config):
    """AdamW with linear warmup then a constant or cosine schedule, counted in optimizer steps."""
    from transformers import get_scheduler

    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay)
    total = t.max_steps * cfg.grpo.num_iterations * cfg.grpo.num_minibatches
    name = "cosine" if t.lr_scheduler == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total)
    return optimizer, scheduler
