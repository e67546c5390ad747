"""Is a saved file whole? Cheap structural checks of safetensors and torch.save files (headers, sizes, the
zip directory), so a truncated download or an interrupted copy is named before anything tries to load it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None: its header parses and its data is all there)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name} is truncated or not a safetensors file (its header says {n} bytes)"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path.name} is not a safetensors file (its header does not parse)"
    needed = 8 + n + max(ends, default=0)
    if needed > size:
        return f"{path.name} is truncated ({size} bytes; its header promises {needed})"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why `path` is not a whole torch.save archive (a zip whose directory, written last, is intact)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except zipfile.BadZipFile:
        return f"{path.name} is truncated or damaged (not a complete torch.save file)"
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror})"
    return None


def folder_problem(folder: Path) -> str | None:
    """The first damaged weight or trainer-state file in a model, adapter or checkpoint folder."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    for path in sorted(folder.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            return problem
    for path in sorted(folder.glob("*.pt")):
        if problem := torch_file_problem(path):
            return problem
    return None
