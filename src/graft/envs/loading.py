"""Finding an Environment class from a config string: a built-in name, "path/to/file.py:ClassName" or
"package.module:ClassName". Every way it can go wrong says which one and what to write instead."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from graft.config import ConfigError
from graft.envs.base import Environment

BUILTIN_ENVIRONMENTS = {
    "guess_number": "graft.envs.examples:GuessNumber",
    "wordle": "graft.envs.wordle:WordleEnv",
}
FORMS = (
    f"a built-in name ({', '.join(sorted(BUILTIN_ENVIRONMENTS))}), 'path/to/file.py:ClassName' "
    "or 'package.module:ClassName'"
)


class EnvironmentSpecError(ConfigError):
    """An environment spec that names nothing usable."""


def load_environment(spec: str) -> type[Environment]:
    """The Environment subclass `spec` names. The class itself is the episode factory (one instance per
    episode, no arguments); bind arguments with functools.partial. A file without ':ClassName' is accepted
    when it defines exactly one Environment subclass."""
    if not isinstance(spec, str) or not spec.strip():
        raise EnvironmentSpecError(f"environment: expected {FORMS}, got {spec!r}")
    spec = spec.strip()
    target = BUILTIN_ENVIRONMENTS.get(spec, spec)
    if target.endswith(".py"):  # a file without a class (and never split a Windows drive's colon)
        where, name = target, None
    else:
        where, sep, name = target.rpartition(":")
        if not sep or not where or not name:
            raise EnvironmentSpecError(f"unknown environment {spec!r}: expected {FORMS}")
    module = _load_file(where, spec) if where.endswith(".py") else _import_module(where, spec)
    return _pick_class(module, name, spec)


def _load_file(path: str, spec: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise EnvironmentSpecError(f"environment {spec!r}: file not found: {file}")
    # a name of its own per file, registered so that dataclasses and pickling inside it work
    name = f"graft_env_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise EnvironmentSpecError(
            f"environment {spec!r}: importing {file} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):  # the module itself (or its package) is missing
            raise EnvironmentSpecError(
                f"environment {spec!r}: no module named {name!r} (for a file write 'path/to/file.py:Class'; "
                f"or one of {FORMS})"
            ) from exc
        raise EnvironmentSpecError(
            f"environment {spec!r}: importing {name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise EnvironmentSpecError(
            f"environment {spec!r}: importing {name} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _pick_class(module, name: str | None, spec: str) -> type[Environment]:
    found = sorted(
        n
        for n, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, Environment) and obj is not Environment
    )
    listed = f"it defines: {', '.join(found)}" if found else "it defines no Environment subclass"
    if name is None:
        if len(found) != 1:
            raise EnvironmentSpecError(
                f"environment {spec!r}: name the class as 'file.py:ClassName'; {listed}"
            )
        name = found[0]
    if not hasattr(module, name):
        raise EnvironmentSpecError(f"environment {spec!r}: no {name!r} in {module.__name__}; {listed}")
    obj = getattr(module, name)
    if not (inspect.isclass(obj) and issubclass(obj, Environment)):
        kind = "a class" if inspect.isclass(obj) else type(obj).__name__
        raise EnvironmentSpecError(
            f"environment {spec!r}: {name} is {kind}, not a subclass of graft.envs.Environment "
            "(subclass it and implement reset(row) -> str and step(reply) -> StepResult)"
        )
    return obj
