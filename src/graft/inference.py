"""Loading a trained model the way it was trained (base, warm-up adapter, then the run's adapter or full
weights) and generating from chat messages with the run's template and system prompt: shared by
graft eval, generate, chat, compare and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from graft.checks.files import folder_problem
from graft.config import Config, ConfigError, load_config
from graft.evaluation import decode_completions, encode_messages
from graft.models import ModelError, load_model, merged_adapter, stop_token_ids
from graft.rollout.sampler import sample
from graft.training.checkpoint import latest_checkpoint, list_checkpoints


@dataclass
class Target:
    cfg: Config  # the run's config (task, system prompt, base model) with any command-line overrides
    weights: (
        Path | None
    )  # the trained adapter or full-model folder on top of cfg.model; None = the model alone
    label: str  # a short name for tables

    @property
    def is_adapter(self) -> bool:
        return self.weights is not None and (self.weights / "adapter_config.json").is_file()


def resolve_target(
    run: str | None, config: str | None, overrides: list[str], checkpoint: str | None = None
) -> Target:
    """A run directory (its config.yaml, and final/ or a checkpoint) or a recipe + overrides (the model as
    configured, model.adapter folded in)."""
    if run is None:
        return Target(load_config(config, overrides), None, "model")
    run_dir = Path(run).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"'{run}' is not a graft run directory (no config.yaml); pass runs/<name>")
    if config is not None:
        raise ConfigError("give a run directory or a recipe, not both (the run's own config.yaml is used)")
    cfg = load_config(run_dir / "config.yaml", [*overrides, "resume=null"])
    warmup = run_dir / "sft" / "final"
    if cfg.model.adapter and not Path(cfg.model.adapter).expanduser().exists() and warmup.is_dir():
        cfg.model.adapter = str(warmup)  # the run folder moved since training: its own warm-up is still here
    if checkpoint is not None:
        weights = Path(checkpoint) if Path(checkpoint).is_dir() else run_dir / "checkpoints" / checkpoint
        if not weights.is_dir():
            raise ConfigError(f"checkpoint '{checkpoint}' not found in {run_dir / 'checkpoints'}")
    elif (run_dir / "final").is_dir():
        weights = run_dir / "final"
    else:
        weights = latest_checkpoint(run_dir / "checkpoints")
        if weights is None:
            raise ConfigError(f"{run_dir} has neither final/ nor a checkpoint: the run saved no weights yet")
        print(f"graft: {run_dir} has no final/ (the run did not finish); using {weights.name}")
    return Target(cfg, weights, run_dir.name)


def load_target(target: Target, with_weights: bool = True):
    """(model, tokenizer) in eval mode. A LoRA run gives a PeftModel, so `model.disable_adapter()` is the
    model before this run (what compare shows as the base)."""
    if target.weights is not None and with_weights and (damaged := folder_problem(target.weights)):
        folder = target.weights.parent  # the run (for final/) or its checkpoints/ (for a checkpoint)
        folder = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
        good = [p.name for p in list_checkpoints(folder) if p != target.weights and folder_problem(p) is None]
        other = f"; use one of its checkpoints instead: --checkpoint {good[-1]}" if good else ""
        raise ModelError(f"{target.weights}: {damaged}, so these weights cannot be loaded{other}")
    model, tokenizer = load_model(target.cfg.model)
    if target.weights is None or not with_weights:
        return model, tokenizer
    if target.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.weights)).eval()
        return model, tokenizer
    if not (target.weights / "config.json").is_file():
        raise ConfigError(f"{target.weights} holds neither an adapter nor a model (no config.json)")
    full = target.cfg.model.model_copy(update={"name": str(target.weights), "adapter": None})
    return load_model(full)


def generate(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    use_adapter: bool = True,
) -> list[str]:
    """One reply per conversation (chat messages ending with the user's turn). temperature 0 = greedy.
    use_adapter=False answers with a PeftModel's base (the model before the run)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = stop_token_ids(model, tokenizer)
    replies: list[str] = []
    peft = hasattr(model, "disable_adapter")
    weights = merged_adapter(model) if use_adapter or not peft else model.disable_adapter()
    with torch.no_grad(), weights:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            rollout = sample(
                model,
                [encode_messages(tokenizer, messages) for messages in chunk],
                group_size=1,
                max_new_tokens=max_new_tokens,
                pad_id=tokenizer.pad_token_id,
                stop_ids=stop_ids,
                temperature=temperature or 1.0,
                greedy=temperature == 0,
                generator=generator,
            )
            replies += decode_completions(tokenizer, rollout.completion_token_lists())
    return replies
