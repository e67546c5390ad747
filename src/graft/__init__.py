"""graft: GRPO reinforcement fine-tuning for reasoning LLMs.

The Python API (`graft.train`, `graft.evaluate`, `graft.export`, `graft.load_run`, `graft.Run`) lives in
graft.api and loads on first use, so `import graft` and the command line do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("train", "evaluate", "export", "load_run", "Run")


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("graft.api"), name)
    raise AttributeError(f"module 'graft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
