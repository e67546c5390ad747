"""Rollout backends: where a GRPO step's completions come from, behind one interface.

- GraftBackend: graft's own sampler (graft.rollout.sampler.sample) on the live policy; runs everywhere.
- VllmBackend (graft.rollout.vllm_backend): a colocated vLLM engine on a CUDA GPU, with its own copy of the
  weights that sync_weights refreshes after each optimizer step.

generation.backend picks one (auto: vLLM where a CUDA GPU, the vllm package and the settings allow it, graft's
sampler otherwise). The loop calls:
    backend = make_backend(cfg, device, policy)   once, before the optimizer allocates its state
    backend.sync_weights(policy)                  before the first rollout and after every optimizer step
    rollout = backend.sample(policy, prompts, group_size=..., ...)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Protocol

import torch

from graft.batch import Rollout
from graft.config import Config
from graft.models import merged_adapter, resolve_model_path
from graft.rollout.sampler import sample
from graft.rollout.vllm_backend import VllmBackend, vllm_sampling_problem

VLLM_EXTRA = "pip install 'graft[vllm]'"
VLLM_HARDWARE = "Linux and an NVIDIA GPU of compute capability 7.0 or newer (CUDA)"
MIN_VLLM = "0.10.2"  # the first vLLM with logprobs_mode (temperature-scaled log-probs), as TRL requires too


class RolloutBackend(Protocol):
    name: str

    def sync_weights(self, policy) -> None:
        """Make the next samples come from the policy's current weights (after each optimizer step)."""

    def sample(
        self,
        policy,
        prompts: list[list[int]],
        *,
        group_size: int,
        max_new_tokens: int,
        pad_id: int,
        stop_ids: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """`group_size` completions per prompt, a group's rows adjacent (see graft.batch.Rollout)."""


class GraftBackend:
    """graft's own sampler on the live policy: nothing to sync, it always samples the current weights."""

    name = "graft"

    def __init__(self, merge_adapter: bool = True):
        self.merge_adapter = merge_adapter

    def sync_weights(self, policy) -> None:
        return None

    def sample(self, policy, prompts: list[list[int]], **options) -> Rollout:
        """graft.rollout.sampler.sample's options (RolloutBackend.sample's), on the LoRA-merged policy."""
        with merged_adapter(policy, self.merge_adapter) as model:
            return sample(model, prompts, **options)


def vllm_install_problem() -> str | None:
    """Why the vllm package cannot serve here (None: an installed, recent enough vLLM); imports nothing."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {VLLM_EXTRA} (it needs {VLLM_HARDWARE})"
    from packaging.version import InvalidVersion, Version

    try:
        version = importlib.metadata.version("vllm")
        if Version(version) < Version(MIN_VLLM):
            return f"vLLM {version} is too old (graft needs >= {MIN_VLLM} for logprobs_mode): {VLLM_EXTRA}"
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        pass  # a source checkout without metadata: let the engine speak for itself
    return None


def _device_problem(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"vLLM needs {VLLM_HARDWARE} and {VLLM_EXTRA}; this run's model.device is {device}"
    if device.index not in (None, 0):
        # the colocated engine takes the process's first visible GPU
        return f"model.device={device}: run with CUDA_VISIBLE_DEVICES={device.index} and model.device=cuda"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        return f"vLLM needs {VLLM_HARDWARE}; this GPU's compute capability is {major}.{minor}"
    return None


def _checkpoint_problem(cfg: Config) -> str | None:
    """A local folder that is already quantized (bitsandbytes, AWQ, GPTQ): vLLM would load it quantized and
    could not take graft's float weights. model.quantization itself is fine: graft loads the engine in
    full precision from the same files and sends it the de-quantized, merged weights."""
    folder = Path(cfg.model.name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a hub id or builtin: nothing to read here
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        return (
            f"model.name={cfg.model.name} is a {method}-quantized checkpoint: vLLM would load it quantized and "
            "cannot take graft's merged float weights; use the unquantized model with model.quantization=4bit"
        )
    return None


def vllm_problem(cfg: Config, device: torch.device | str) -> str | None:
    """Why vLLM cannot be this run's rollout engine (None: it can)."""
    g = cfg.generation
    if cfg.train.fsdp:
        return (
            "train.fsdp shards the policy, and graft does not yet gather it into a vLLM engine; the rollout "
            "samples the gathered weights through the model (generation.backend=graft)"
        )
    return (
        _device_problem(device)
        or vllm_install_problem()
        or vllm_sampling_problem(g.top_p, g.min_new_tokens)
        or _checkpoint_problem(cfg)
    )


def backend_problem(cfg: Config, device: torch.device | str) -> str | None:
    """Why generation.backend cannot run here (None: it can). Only an explicit 'vllm' can fail: 'auto' falls
    back to graft's sampler. Checked without importing vLLM or loading anything."""
    if cfg.generation.backend != "vllm":
        return None
    problem = vllm_problem(cfg, device)
    return (
        None if problem is None else f"generation.backend=vllm: {problem} (or use generation.backend=graft)"
    )


def resolve_backend(cfg: Config, device: torch.device | str) -> tuple[str, str | None]:
    """('graft' or 'vllm', why auto did not take vLLM or None) for this run on `device`."""
    backend = cfg.generation.backend
    if backend == "graft":
        return "graft", None
    if backend == "vllm":
        if problem := backend_problem(cfg, device):
            raise ValueError(problem)
        return "vllm", None
    problem = vllm_problem(cfg, device)
    return ("graft", problem) if problem else ("vllm", None)


def make_backend(cfg: Config, device: torch.device | str, policy) -> RolloutBackend:
    """The run's rollout backend. Create it before the optimizer's state: vLLM checks at start that its
    generation.gpu_memory_utilization share of the GPU is free."""
    name, _ = resolve_backend(cfg, device)
    if name == "graft":
        return GraftBackend(cfg.generation.merge_adapter)
    dtype = policy.dtype if cfg.generation.dtype == "auto" else getattr(torch, cfg.generation.dtype)
    return VllmBackend.create(resolve_model_path(cfg.model), cfg, dtype)
