"""A resumed run against the config it was trained with: settings that cannot change mid-run (the model,
its adapter's shape, the task) are refused by name before anything is written or loaded; the ones that
can (learning rate, steps, rewards, ...) are listed, and the run records them in a config file of their own
instead of overwriting the one its earlier steps used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from graft.config import Config, flatten

# prefix -> why a change there cannot continue the run
FIXED = {
    "model.name": "the checkpoint holds weights of that model",
    "model.revision": "the checkpoint holds weights of that model revision",
    "model.adapter": "the run's starting weights include that adapter",
    "model.trust_remote_code": "the model's code is part of what was trained",
    "lora.enabled": "the checkpoint is an adapter (or a full model), not the other",
    "train.fsdp": "the checkpoint's optimizer state is keyed for sharded (or whole) parameters",
    "lora.r": "the adapter's tensors have that shape",
    "lora.target_modules": "the adapter has layers for those modules",
    "lora.alpha": "the adapter's scale would change its trained weights' effect",
    "task.": "the earlier steps trained on that task and the prompt order continues it",
    "sft.": "the run started from that warm-up",
}
# not settings of the run: where it is, how it prints, what to resume (train.seed: kept from the checkpoint)
IGNORED = ("resume", "logging.run_name", "logging.output_dir", "logging.progress", "logging.print_config",
           "model.cache_dir", "train.seed")  # fmt: skip


def recorded_config(run_dir: Path, step: int) -> tuple[Path, dict] | None:
    """(file, config) the run used for the steps up to `step`: the newest config.from-step-N.yaml with
    N <= step + 1, else config.yaml; None when the run has none (or it does not parse)."""
    candidates = [(0, run_dir / "config.yaml")]
    for path in run_dir.glob("config.from-step-*.yaml"):
        try:
            candidates.append((int(path.stem.rpartition("-")[2]), path))
        except ValueError:
            continue
    for start, path in sorted(candidates, reverse=True):
        if start <= step + 1 and path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return None
            return (path, data) if isinstance(data, dict) else None
    return None


def _as_warm_started(new: dict[str, Any], old: dict[str, Any]) -> None:
    """The saved config of a run with an SFT warm-up reads "GRPO from <run>/sft/final" (sft.enabled false):
    read the new config the same way, so an unchanged recipe compares equal."""
    key = "model.adapter" if new.get("lora.enabled", True) else "model.name"
    if new.get("sft.enabled") and not old.get("sft.enabled") and str(old.get(key)).endswith("sft/final"):
        new["sft.enabled"] = False
        new[key] = old[key]


def compare(cfg: Config, run_dir: Path, step: int) -> tuple[list[str], list[str], Path | None]:
    """(refused, changed, the file compared with): each a line naming the key, its old and new value."""
    recorded = recorded_config(run_dir, step)
    if recorded is None:
        return [], [], None
    path, saved = recorded
    old, new = flatten(saved), flatten(cfg.model_dump(mode="json"))
    _as_warm_started(new, old)
    refused, changed = [], []
    for key, value in new.items():
        if key not in old or key.startswith(IGNORED) or _same(old[key], value):
            continue
        why = next((reason for prefix, reason in FIXED.items() if key.startswith(prefix)), None)
        line = f"{key}: {old[key]!r} -> {value!r}"
        if why:
            refused.append(f"{line} ({why})")
        else:
            changed.append(line)
    return refused, changed, path


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resume_problems(cfg: Config, run_dir: Path, step: int) -> tuple[list[str], list[str]]:
    """(problems for validate, changes the run records): what resuming `run_dir` at `step` with `cfg` means."""
    refused, changed, path = compare(cfg, run_dir, step)
    problems = []
    if refused:
        problems.append(
            f"resume: {run_dir} was trained with other settings that a resumed run cannot change "
            f"(compared with {path.name}): " + "; ".join(refused) + ". Resume with the run's own values "
            "(drop those overrides) or start a new run with another logging.run_name"
        )
    return problems, changed
