"""Checkpoints written atomically: a folder is built under a temporary name and renamed when complete,
so an interrupted save never looks like a good checkpoint."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "step-"


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def _atomic_dir(target: Path, write) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_model(model, tokenizer, target: Path) -> Path:
    """The adapter (LoRA) or the full model, with the tokenizer, loadable by PEFT / transformers."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, write)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    generator: torch.Generator | None,
    keep_last_n: int,
) -> Path:
    """Everything needed to continue the run at `step`: weights, optimizer, scheduler, data position, RNGs."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "trainer_state": trainer_state,
                "rng": rng_state(generator),
            },
            tmp / "trainer_state.pt",
        )

    path = _atomic_dir(checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:06d}", write)
    (checkpoints_dir / "latest").write_text(path.name + "\n")  # written last: points only at complete ones
    prune_checkpoints(checkpoints_dir, keep_last_n)
    return path


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def prune_checkpoints(checkpoints_dir: Path, keep_last_n: int) -> None:
    for old in list_checkpoints(checkpoints_dir)[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)
