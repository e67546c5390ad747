"""Loading: YAML + overrides -> Config, with every problem reported at once."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from graft.config.schema import Config, ConfigError
from graft.yaml_strict import yaml_load


def _sections(model: type[BaseModel]) -> dict[str, Any]:
    """Nested dict of field names -> sub-dict (for sections) or None (for leaves)."""
    tree: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        tree[name] = _sections(ann) if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tree


def _all_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, sub in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if sub is not None:
            paths.extend(_all_paths(sub, path + "."))
    return paths


def _suggest(path: str, valid: list[str]) -> str:
    section, _, leaf = path.rpartition(".")
    by_leaf: dict[str, list[str]] = {}
    for p in valid:
        by_leaf.setdefault(p.rpartition(".")[2], []).append(p)
    # the right key under the wrong section (`beta=`, `train.beta=`) first, then a misspelling
    close = by_leaf.get(leaf) or difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
    if not close:
        match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        if match:
            candidates = by_leaf[match[0]]
            close = [p for p in candidates if p.rpartition(".")[0] == section] or candidates
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_keys(data: dict, tree: dict[str, Any], valid: list[str], prefix: str = "") -> list[str]:
    problems = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in tree:
            problems.append(f"unknown key '{path}'{_suggest(path, valid)}")
        elif tree[key] is not None:
            if isinstance(value, dict):
                problems.extend(_unknown_keys(value, tree[key], valid, path + "."))
            elif value is not None:
                problems.append(f"'{path}' is a section; give it a mapping of keys, not {value!r}")
    return problems


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' has no '='; write it as key=value, e.g. grpo.beta=0.04")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key before '='")
    try:  # YAML typing: 3 -> int, 0.04 -> float, true -> bool, [a, b] -> list, null -> None
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _format_validation_error(err: ValidationError, data: dict) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) or e["type"] != "literal_error")
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and e["type"] not in ("value_error", "model_type"):
            problems.append(f"'{loc}': {msg} (got {e['input']!r})")
        else:
            problems.append(f"'{loc}': {msg}" if loc else msg)
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or none: all defaults), apply `a.b=value` overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"config file '{path}' is a folder, not a YAML file; pass a recipe such as configs/arithmetic.yaml"
            )
        if not path.is_file():
            raise ConfigError(
                f"config file '{path}' does not exist; pass a YAML file such as configs/arithmetic.yaml"
            )
        loaded = _read_yaml_file(path)
        if loaded is None:
            raise ConfigError(
                f"config file '{path}' is empty (no keys); write the sections it changes (see "
                "configs/arithmetic.yaml), or run without a recipe for the defaults"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file '{path}' must hold a mapping of sections, not {type(loaded).__name__}"
            )
        data = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)

    tree = _sections(Config)
    valid = _all_paths(tree)
    problems = _unknown_keys(data, tree, valid)
    if not problems:
        try:
            return Config.model_validate(data)
        except ValidationError as err:
            problems = _format_validation_error(err, data)
    where = f" in {path}" if path else ""
    raise ConfigError(
        f"{len(problems)} config problem(s){where}:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def _read_yaml_file(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line}); "
            "save it as UTF-8"
        ) from exc
    try:
        return yaml_load(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf: the documentation `graft config --help-keys` prints."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, f"{prefix}{name}."))
        else:
            rows.append(
                (
                    f"{prefix}{name}",
                    repr(field.get_default(call_default_factory=True)),
                    field.description or "",
                )
            )
    return rows
