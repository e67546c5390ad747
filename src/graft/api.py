"""The Python API for notebooks and scripts: `graft.train`, `graft.evaluate`, `graft.export` and
`graft.load_run` return Python objects (a Run, a dict, a Path) where the command line prints. Both run the
same code: `graft train | eval | generate | export` are thin layers over these functions and over the work
functions of graft.commands that they call.

    import graft
    run = graft.train("configs/arithmetic.yaml", grpo={"beta": 0.04}, train={"max_steps": 3})
    run.accuracy_before, run.accuracy_after, run.metrics[-1]
    run.generate("What is 17 + 25?")
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel
from rich.console import Console

from graft.commands import evaluate_target, export_target, generate_replies
from graft.config import Config, ConfigError, load_config
from graft.quiet import quiet_libraries

if TYPE_CHECKING:
    from graft.inference import Target

__all__ = ["Run", "evaluate", "export", "load_run", "resolve_config", "section_overrides", "train"]

ConfigSource = str | Path | Config | None  # a YAML recipe, a Config object, or None for the defaults


# ------------------------------------------------------------------------------------------- config


def section_overrides(sections: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Config sections given as (nested) dicts, as the dotted `key=value` overrides of the command line,
    so that load_config validates them exactly as it validates those: an unknown section or key fails with
    the same message and the closest valid key. Values travel as YAML, which reads back what it wrote; a
    pydantic section object counts as its dict, and an empty dict changes nothing."""
    overrides: list[str] = []
    for key, value in sections.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping):
            overrides += section_overrides(value, f"{prefix}{key}.")
        else:
            overrides.append(f"{prefix}{key}={_yaml_value(f'{prefix}{key}', value)}")
    return overrides


def _plain(value: Any) -> Any:
    """Tuples and paths as YAML can write them (lists and strings), at any depth."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml_value(key: str, value: Any) -> str:
    try:
        text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"))
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"'{key}': {value!r} is not a config value (give a string, number, bool, list or None)"
        ) from exc
    return text.removesuffix("\n...\n").removesuffix("\n")  # a scalar ends its document with '...'


def resolve_config(config: ConfigSource = None, /, **sections: Any) -> Config:
    """The config a call means: a YAML recipe, a Config or the defaults (None), with each keyword, a config
    section as a dict, merged over it key by key, everything validated by load_config at once."""
    overrides = section_overrides(sections)
    if isinstance(config, Config):
        if not overrides:
            return config
        return load_config(None, [*section_overrides(config.model_dump(mode="json")), *overrides])
    if config is not None and not isinstance(config, str | Path):
        raise ConfigError(
            f"config must be a YAML recipe path, a graft Config or None, not {type(config).__name__}"
        )
    return load_config(config, overrides)


# ---------------------------------------------------------------------------------------------- run


class Run:
    """A run directory seen from Python. What training wrote (config, metrics, evaluations) is read when
    asked, so a run still training elsewhere shows its progress; the trained model is loaded once, on the
    first generate or evaluate, and kept for the calls after it."""

    def __init__(self, path: str | Path, checkpoint: str | None = None):
        """checkpoint: a checkpoint name (step-000010) or folder to use instead of final/."""
        self.path = Path(path).expanduser()
        if not (self.path / "config.yaml").is_file():
            raise ConfigError(f"'{path}' is not a graft run directory (no config.yaml); pass runs/<name>")
        self.checkpoint = checkpoint
        self._model: tuple[Target, Any, Any] | None = None

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    @property
    def config(self) -> Config:
        """The resolved config the run trained with (its config.yaml)."""
        return load_config(self.path / "config.yaml")

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl, one dict per line: the steps, and the held-out evaluations (eval/accuracy)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def eval(self) -> dict[str, dict[str, Any]]:
        """eval.json: held-out results by tag ('before', 'step_10', 'after'); empty when there are none."""
        path = self.path / "eval.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def accuracy_before(self) -> float | None:
        """Held-out greedy accuracy before training (None when the run did not evaluate at start)."""
        return self.eval.get("before", {}).get("accuracy")

    @property
    def accuracy_after(self) -> float | None:
        """Held-out greedy accuracy after the last step (None until the run has finished evaluating)."""
        return self.eval.get("after", {}).get("accuracy")

    def generate(
        self,
        prompts: str | list[str],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """One reply per prompt, as `graft generate --run` gives it: a user turn after the run's system
        prompt, through its chat template. temperature 0 = greedy; max_new_tokens defaults to the run's."""
        target, model, tokenizer = self._loaded()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_replies(target, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, loaded=(model, tokenizer))  # fmt: skip

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """graft.evaluate on this run (the same options), reusing the model generate loaded."""
        return evaluate(self, **options)

    def export(self, output: str | Path, **options: Any) -> Path:
        """graft.export of this run's model into `output` (the same options)."""
        return export(self, output, **options)

    def _loaded(self) -> tuple[Target, Any, Any]:
        """(target, model, tokenizer), loaded on the first call only."""
        if self._model is None:
            from graft.inference import load_target, resolve_target

            quiet_libraries()
            target = resolve_target(str(self.path), None, [], self.checkpoint)
            self._model = (target, *load_target(target))
        return self._model


def load_run(path: str | Path, checkpoint: str | None = None) -> Run:
    """An existing run directory (runs/<name>) as a Run; checkpoint: use it instead of final/."""
    return Run(path, checkpoint)


# ---------------------------------------------------------------------------------------- functions


def train(
    config: ConfigSource = None,
    /,
    *,
    console: Console | None = None,
    stop_after: int | None = None,
    **sections: Any,
) -> Run:
    """Train as `graft train` does and return the finished Run.

    config: a YAML recipe path, a Config, or None (the defaults). Each other keyword is a config section as
    a dict, merged over it: train={"max_steps": 3} is the override train.max_steps=3, and a mistyped
    section or key fails before anything loads, naming the closest valid one. console: where progress and
    tables go (default: a rich Console, which also renders in Jupyter). stop_after=k stops after step k with
    a checkpoint, as Ctrl-C would (TrainingInterrupted; resume with resume="auto")."""
    from graft.training.loop import train as train_loop

    cfg = resolve_config(config, **sections)
    quiet_libraries()
    return Run(train_loop(cfg, console=console, stop_after=stop_after))


def _resolve_target(
    source: Run | ConfigSource, checkpoint: str | None, sections: Mapping[str, Any]
) -> Target:
    """A run (a Run or its directory: its config and trained weights) or a recipe, Config or the defaults
    (the model as configured), with `sections` merged over the config, as the commands' --run / recipe."""
    from graft.inference import Target, resolve_target

    if isinstance(source, Run):
        return resolve_target(
            str(source.path), None, section_overrides(sections), checkpoint or source.checkpoint
        )
    if isinstance(source, str | Path) and Path(source).expanduser().is_dir():
        return resolve_target(str(source), None, section_overrides(sections), checkpoint)
    return Target(resolve_config(source, **sections), None, "model")


def evaluate(
    target: Run | ConfigSource = None,
    /,
    *,
    base: bool = False,
    split: str = "eval",
    num: int | None = None,
    samples: int = 0,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    checkpoint: str | None = None,
    output: str | Path | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """What `graft eval` reports, as the dict `graft eval --json` prints: accuracy, accuracy_strict,
    format_compliance, pass_at_k / maj_at_k (with samples=n), lengths, truncation, num_problems, samples.

    target: a Run or run directory (its trained model; base=True: the model before the run), or a recipe
    path, Config or None (the model as configured). split: 'eval' or 'train'; num: the first N problems;
    output: also write the dict there as JSON. Other keywords are config sections merged over the
    target's config, as in train (e.g. generation={"max_new_tokens": 128})."""
    if split not in ("eval", "train"):
        raise ConfigError(f"split must be 'eval' or 'train', not {split!r}")
    quiet_libraries()
    loaded = None
    if isinstance(target, Run) and not base and not sections and checkpoint is None:
        resolved, model, tokenizer = target._loaded()
        loaded = (model, tokenizer)
    else:
        resolved = _resolve_target(target, checkpoint, sections)
    return evaluate_target(resolved, base=base, split=split, num=num, samples=samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, output=output, loaded=loaded)  # fmt: skip


def export(
    run: Run | str | Path,
    output: str | Path,
    /,
    *,
    adapter: bool = False,
    merged: bool = False,
    gguf: bool = False,
    gguf_dtype: str = "f16",
    parity: bool = True,
    parity_tol: float | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    force: bool = False,
    checkpoint: str | None = None,
    console: Console | None = None,
) -> Path:
    """What `graft export` writes, into `output` (returned): adapter=True the LoRA adapter (output/adapter);
    a merged full model (output/merged, checked against the adapter unless parity=False) when merged=True,
    for gguf=True, or when nothing else is asked; gguf=True a GGUF file (gguf_dtype f16, bf16 or f32);
    push_to_hub="me/name" uploads merged/ (else adapter/). force=True replaces a non-empty output. Each
    finished piece is reported on `console` (default: a rich Console)."""
    if gguf_dtype not in ("f16", "bf16", "f32"):
        raise ConfigError(f"gguf_dtype must be 'f16', 'bf16' or 'f32', not {gguf_dtype!r}")
    quiet_libraries()
    say = (console or Console(soft_wrap=True)).print
    return export_target(
        _resolve_target(run, checkpoint, {}), output, adapter=adapter, merged=merged, gguf=gguf,
        gguf_dtype=gguf_dtype, parity=parity, parity_tol=parity_tol, push_to_hub=push_to_hub,
        private=private, force=force, say=say,
    )  # fmt: skip
