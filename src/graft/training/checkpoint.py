"""Checkpoints written atomically: a folder is built under a temporary name and renamed when complete,
so an interrupted save never looks like a good checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.checks.files import folder_problem

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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the ones already on disk are intact."""


def atomic_dir(
    target: Path,
    write,
    advice: str = "free disk space or move logging.output_dir. Checkpoints written before are intact.",
) -> Path:
    """Fill a hidden temporary folder with write(tmp), then rename it to target: readers never see half a
    folder, and a failure leaves nothing behind but a CheckpointError whose message ends with `advice`."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot create {target.parent}: {exc.strerror}") from exc
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as exc:  # OSError, safetensors' SafetensorError, torch.save's RuntimeError: all I/O here
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
        raise CheckpointError(f"could not write {target} ({reason}); {advice}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_model(model, tokenizer, target: Path, state_dict: dict | None = None) -> Path:
    """The adapter (LoRA) or the full model, with the tokenizer, loadable by PEFT / transformers.
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""

    return atomic_dir(target, lambda tmp: _write_model(model, tokenizer, tmp, state_dict))


def _write_model(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(folder, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


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
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Everything needed to continue the run at `step`: weights, optimizer, scheduler, data position, RNGs.
    `model_state`, `optimizer_state`: a sharded model's, gathered (graft.training.fsdp), written instead
    of the model's and optimizer's own; the optimizer's is then keyed by parameter name."""

    def write(tmp: Path) -> None:
        _write_model(model, tokenizer, tmp, model_state)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(),
                "trainer_state": trainer_state,
                "rng": rng_state(generator),
            },
            tmp / "trainer_state.pt",
        )

    path = atomic_dir(checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:06d}", write)
    (checkpoints_dir / "latest").write_text(path.name + "\n")  # written last: points only at complete ones
    prune_checkpoints(checkpoints_dir, keep_last_n)
    return path


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / "trainer_state.pt").is_file()


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Torn saves live under a hidden temporary name and never match."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        p for p in checkpoints_dir.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and is_complete(p)
    )


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: complete, its files whole)."""
    if not is_complete(path):
        return f"{path.name} is not a complete checkpoint (no trainer_state.pt)"
    problem = folder_problem(path)
    return f"{path.name}/{problem}" if problem else None


def find_resumable(checkpoints_dir: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint whose files are whole, or None; why each newer one was passed over). The one
    `latest` names comes first; a damaged one (a truncated copy, a full disk) falls back to the one before."""
    found = list_checkpoints(checkpoints_dir)
    pointer = checkpoints_dir / "latest"
    if pointer.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            named = checkpoints_dir / pointer.read_text().strip()
            if named in found:  # newer ones than the pointer are unfinished business of a killed save
                found = found[: found.index(named) + 1]
    damaged = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append(problem)
    return None, damaged


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is missing or stale; a
    damaged one is passed over for the one before it (find_resumable says why)."""
    return find_resumable(checkpoints_dir)[0]


def remove_torn_saves(checkpoints_dir: Path) -> None:
    """Temporary folders left by a save that was killed (the checkpoint before it is intact)."""
    if checkpoints_dir.is_dir():
        for p in checkpoints_dir.iterdir():
            if p.name.startswith(f".{CHECKPOINT_PREFIX}") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # our own file, written by save_checkpoint: it holds numpy RNG state, which needs weights_only=False
    try:
        return torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    except Exception as exc:  # a damaged file: torch raises RuntimeError, pickle errors, EOFError, ...
        raise CheckpointError(
            f"cannot read {checkpoint / 'trainer_state.pt'} ({_reason(exc)}); resume from an earlier "
            f"checkpoint with resume=<run>/checkpoints/step-NNNNNN, or remove {checkpoint.name}"
        ) from exc


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


def prune_checkpoints(checkpoints_dir: Path, keep_last_n: int) -> None:
    for old in list_checkpoints(checkpoints_dir)[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A full model's weights as save_pretrained wrote them: model.safetensors, or the shards its index
    names (a model above save_pretrained's shard size)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "model.safetensors")
    weights = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(load_file(folder / name))
    return weights


def restore_checkpoint(
    checkpoint: Path, state: dict, policy, optimizer, scheduler, order, generator, rank: int = 0
) -> None:
    """Put the policy weights, optimizer, schedule, data position and every RNG back as they were saved
    (data-parallel runs: this rank's RNGs; a rank the checkpoint did not have starts from the main's)."""
    from safetensors.torch import load_file

    from graft.training.fsdp import is_sharded, load_full_state

    sharded = is_sharded(policy)
    try:
        if hasattr(policy, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy, load_file(checkpoint / "adapter_model.safetensors"))
        else:
            if sharded:  # every rank reads the whole checkpoint and keeps its shards
                missing, unexpected = load_full_state(
                    policy, optimizer, read_weights(checkpoint), state["optimizer"]
                )
            else:
                missing, unexpected = policy.load_state_dict(read_weights(checkpoint), strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied head is saved once
                raise CheckpointError(
                    f"checkpoint {checkpoint} does not match the model: missing {missing[:3]}"
                )
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged file, or weights of another shape (a changed lora.r)
        raise CheckpointError(
            f"cannot restore the weights of {checkpoint} ({_reason(exc)}); resume with the run's own "
            "config (see its config.yaml) or from an earlier checkpoint (resume=<path>)"
        ) from exc
    if not sharded:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    order.restore(state["trainer_state"]["order"])
    ranks_rng = state["trainer_state"].get("rank_rng") or [state["rng"]]
    restore_rng(ranks_rng[rank] if rank < len(ranks_rng) else state["rng"], generator)
