"""Checks that run before any weights load: task, rewards, model location, run directory, disk and memory.

Every problem is collected and reported at once, each saying what is wrong and how to fix it.
`graft validate recipe.yaml` runs these checks alone; `graft train` runs them first.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft.config import Config, ConfigError
from graft.cpu.plan import FastPaths, plan_fast_paths
from graft.tasks.base import Task

GiB = 1024**3


@dataclass
class MemoryEstimate:
    """Peak bytes of a GRPO step, by part (rough, on the high side)."""

    parts: dict[str, int]
    available: int | None  # bytes free for the run on its device, None when unknown
    device: str

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        rows = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        free = f"{self.available / GiB:.1f} GiB available" if self.available else "availability unknown"
        return f"~{self.total / GiB:.1f} GiB on {self.device} ({rows} GiB); {free}"


# bytes per weight of a quantized linear layer: NF4 is 4 bits plus, with double quantization, ~0.127 bits
# of block scales (64-weight blocks, 8-bit absmax per block, float32 per 256 blocks); LLM.int8 keeps one
# float32 scale per row, negligible next to a byte per weight
QUANT_BYTES = {"4bit": (4 + 8 / 64 + 32 / (64 * 256)) / 8, "8bit": 1.0}

LORA_WRAPPABLE = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D")


def _model_shape(path: str, cfg: Config):
    """(transformers config, parameter count, {linear layer name: (in, out)}, {name: class} of the modules
    LoRA can wrap) without allocating weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    head = model.get_output_embeddings()
    linears = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    }
    n_params = sum(p.numel() for p in model.parameters())
    wrappable = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in LORA_WRAPPABLE}
    return config, n_params, linears, wrappable


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def estimate_memory(
    cfg: Config,
    config,
    n_params: int,
    linears: dict,
    device: torch.device,
    paths: FastPaths,
    prompt_tokens: int | None = None,
    available: int | None = None,
    world: int = 1,
) -> MemoryEstimate:
    """`paths`: the run's plan (graft.cpu.plan) for this model config: which copies and recordings exist.
    `prompt_tokens`: the longest prompt, chat template included (graft.checks.prompts); unknown: 256.
    `available`: the bytes to compare against (default: what the device has free now). `world`: the
    processes; with train.fsdp each holds 1/world of the weights, gradients, Adam and reference."""
    from graft.models import resolve_dtype

    dtype_bytes = torch.finfo(resolve_dtype(cfg.model.dtype, device)).bits // 8
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    ffn = getattr(config, "intermediate_size", 4 * hidden)
    vocab = config.vocab_size
    prompt = prompt_tokens or 256  # a batch is padded to its longest prompt: count the longest there is
    tokens = prompt + cfg.generation.max_new_tokens
    batch = max(cfg.train.prompts_per_step // world, 1) * cfg.grpo.num_generations  # each process: its share
    micro = min(cfg.train.micro_batch_size, batch)

    linear_params = sum(i * o for i, o in linears.values())
    parts = {"weights": n_params * dtype_bytes}
    if cfg.model.quantization != "none":
        # bitsandbytes quantizes the linear layers only; embeddings, head and norms stay in model.dtype
        quantized = int(linear_params * QUANT_BYTES[cfg.model.quantization])
        parts["weights"] = quantized + (n_params - linear_params) * dtype_bytes
    # the rollout's own copy of the policy (graft.cpu.sampling.SamplingCopy) replaces the merged-layer copy
    sampling_copy = paths.sampling_copy
    copy_bytes = torch.finfo(paths.sampling_dtype).bits // 8
    if cfg.lora.enabled:
        targets = cfg.lora.target_modules
        chosen = [v for k, v in linears.items() if targets == "all-linear" or k.rsplit(".", 1)[-1] in targets]
        parts["adapter + Adam"] = sum(cfg.lora.r * (i + o) for i, o in chosen) * 16
        if cfg.generation.merge_adapter and not sampling_copy and cfg.model.quantization == "none":
            parts["merged copy"] = linear_params * dtype_bytes
    else:
        parts["grads + Adam"] = n_params * (4 + 8)
        if cfg.grpo.beta > 0:
            parts["reference copy"] = n_params * dtype_bytes
    if cfg.train.fsdp and world > 1:  # graft.training.fsdp: shards, and the whole weights while sampling
        for key in ("weights", "grads + Adam", "reference copy"):
            if key in parts:
                parts[key] //= world
        parts["gathered weights"] = n_params * dtype_bytes
    parts["rollout KV + logits"] = batch * (tokens * layers * 2 * kv_dim * dtype_bytes + vocab * 16)
    # a group's completions share one encoding of their prompt (rollout and training pass alike)
    groups = min(micro, -(-micro // cfg.grpo.num_generations) + (micro % cfg.grpo.num_generations > 0))
    micro_tokens = micro * cfg.generation.max_new_tokens + groups * prompt
    # activations kept for backward per token and layer: attention and MLP inputs (~6 hidden + 3 ffn)
    parts["activations"] = micro_tokens * layers * (6 * hidden + 3 * ffn) * max(dtype_bytes, 2)
    if cfg.train.gradient_checkpointing:  # each layer's input is kept, one layer's activations at a time
        parts["activations"] = micro_tokens * (layers * hidden + 6 * hidden + 3 * ffn) * max(dtype_bytes, 2)
    own_decoder, replays = paths.own_decoder, paths.replay
    if replays:  # graft.cpu.replay: the rollout records each layer's product inputs for the whole batch
        # in the sampling copy's dtype: bf16 in the mixed pair
        parts["activations"] = micro_tokens * layers * (5 * hidden + 2 * kv_dim + 2 * ffn) * copy_bytes
    if sampling_copy:
        parts["sampling copy"] = n_params * copy_bytes
        if own_decoder:
            # graft's decoder drops the layers each refresh rebuilds (the adapted ones) after the rollout,
            # so they share memory with the training pass's activations: count them only past those
            # (not when replaying: the recording is made while those layers are in use)
            rebuilt = sum(i * o for i, o in chosen) if cfg.lora.enabled else linear_params
            kept = n_params - rebuilt  # the LM head, embeddings, norms and layers no adapter touches
            shared = 0 if replays else parts["activations"]
            parts["sampling copy"] = kept * copy_bytes + max(0, rebuilt * copy_bytes - shared)
    parts["log-prob chunks"] = 512 * vocab * 4 * 3
    if device.type == "cpu":
        parts["runtime"] = 600 * 1024**2  # Python, torch, tokenizer
    elif device.type == "cuda":
        parts["runtime"] = GiB  # the CUDA context and kernels, allocator slack
    return MemoryEstimate(
        parts, available if available is not None else available_memory(device), str(device)
    )


def _memory_advice(est: MemoryEstimate, cfg: Config) -> str:
    biggest = max(est.parts, key=est.parts.get)
    micro = min(cfg.train.micro_batch_size, cfg.train.prompts_per_step * cfg.grpo.num_generations)
    per_completion = est.parts["activations"] / micro
    fits = int((0.9 * (est.available or 0) - (est.total - est.parts["activations"])) // per_completion)
    advice = {
        "activations": (
            f"train.micro_batch_size={fits} would fit"
            if fits >= 1
            else f"lower generation.max_new_tokens (now {cfg.generation.max_new_tokens})"
        )
        + " (activations grow with micro_batch_size x tokens)",
        "rollout KV + logits": "lower train.prompts_per_step or grpo.num_generations",
        "merged copy": "set generation.merge_adapter=false",
        "grads + Adam": "train a LoRA adapter (lora.enabled=true), shard over more processes (train.fsdp) "
        "or pick a smaller model",
        "gathered weights": "model.dtype=bfloat16 (each process gathers the whole model to sample)",
        "reference copy": "use LoRA (its reference costs nothing) or grpo.beta=0",
        "weights": "pick a smaller model"
        + (
            ", or model.dtype=bfloat16"
            if est.parts["weights"] and cfg.model.dtype in ("auto", "float32")
            else ""
        )
        + (
            ", or model.quantization=4bit (QLoRA)"
            if cfg.lora.enabled and cfg.model.quantization == "none"
            else ""
        ),
    }.get(biggest, "lower train.micro_batch_size")
    return f"the largest part is {biggest}: {advice}"


def _writable_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


@dataclass
class Checked:
    """What the checks built on the way, handed to the run so nothing is loaded twice."""

    problems: list[str]
    memory: MemoryEstimate | None
    task: Task | None
    rewards: dict[str, Callable]  # spec -> function, for the specs that loaded
    paths: FastPaths | None = None  # the fast paths this machine takes (None: no device)
    notes: list[str] = field(default_factory=list)  # what the run should say (prompts cut or dropped)
    resume_changes: list[str] = field(default_factory=list)  # settings a resume changes ("key: old -> new")


def check_run(cfg: Config, estimate: bool = True) -> tuple[list[str], MemoryEstimate | None]:
    """(problems, memory estimate) for a resolved config; loads no weights."""
    checked = _check(cfg, estimate)
    return checked.problems, checked.memory


def data_parallel_problems(cfg: Config, world: int) -> list[str]:
    """What keeps `cfg` from running in `world` data-parallel processes (graft.training.distributed)."""
    if world == 1:
        return []
    problems = []
    if cfg.train.prompts_per_step % world:
        problems.append(
            f"'train.prompts_per_step': {cfg.train.prompts_per_step} prompts do not split over {world} "
            f"processes (each keeps whole groups); use a multiple of {world}"
        )
    if cfg.grpo.dynamic_sampling:
        problems.append(
            "'grpo.dynamic_sampling': not supported with several processes yet (each would draw its own "
            "extra prompts); set it to false or run one process"
        )
    if cfg.train.skip_solved:
        problems.append(
            "'train.skip_solved': not supported with several processes yet (each would rest only the "
            "problems of its own groups); set it to 0 or run one process"
        )
    if cfg.sft.enabled:
        problems.append(
            "'sft.enabled': the warm-up runs in one process; run `graft sft` first, then train with "
            "model.adapter=<sft run>/final"
        )
    if "cuda" in cfg.model.device and torch.cuda.is_available() and world > torch.cuda.device_count():
        problems.append(f"{world} processes but {torch.cuda.device_count()} GPU(s): one process per GPU")
    return problems


def fsdp_problems(cfg: Config, world: int) -> list[str]:
    """What keeps `cfg` from training sharded over `world` processes (train.fsdp, graft.training.fsdp)."""
    from graft.tasks import environment_spec

    if not cfg.train.fsdp:
        return []
    problems = []
    if world < 2:
        problems.append(
            "'train.fsdp': sharding needs several processes; launch with `graft train --nproc N` (N >= 2) "
            "or torchrun, or set train.fsdp=false"
        )
    if cfg.lora.enabled:
        problems.append(
            "'train.fsdp': shards full fine-tuning only (a LoRA adapter is small enough to keep whole on "
            "every rank); set lora.enabled=false, or leave train.fsdp=false for data-parallel LoRA (with "
            "model.quantization=4bit for a base too large for one device)"
        )
    if cfg.model.quantization != "none":
        problems.append(
            "'train.fsdp': bitsandbytes' quantized weights are not sharded; set model.quantization=none"
        )
    if environment_spec(cfg.task) is not None:
        problems.append(
            "'train.fsdp': multi-turn episodes are not sharded yet; train them with train.fsdp=false"
        )
    return problems


def _check(cfg: Config, estimate: bool = True, world: int = 1) -> Checked:
    from graft.checks.calls import gate_problem, reward_signature_problem
    from graft.envs.loading import load_environment
    from graft.models import (
        ModelError,
        adapter_location_problem,
        model_location_problem,
        quantization_problem,
        resolve_device,
        resolve_model_path,
    )
    from graft.rewards.runtime import load_reward, reward_name
    from graft.rollout.backends import backend_problem
    from graft.tasks import build_task, environment_spec
    from graft.training.run import RunDir, RunDirError

    problems: list[str] = data_parallel_problems(cfg, world) + fsdp_problems(cfg, world)
    notes: list[str] = []
    if cfg.train.max_minutes is not None and cfg.train.lr_scheduler != "constant":
        notes.append(
            f"train.lr_scheduler={cfg.train.lr_scheduler} decays over train.max_steps="
            f"{cfg.train.max_steps} steps, not over train.max_minutes: if fewer steps fit the time budget, "
            "the run ends before the learning rate has come down; set train.max_steps to about the steps "
            "that fit (a run's step time is in its metrics.jsonl, time/step)"
        )
    task, rewards = None, {}
    try:
        task = build_task(cfg.task)
    except ConfigError as exc:
        problems.append(str(exc))
    if spec := environment_spec(cfg.task):  # a user's environment file: found, importable, an Environment
        try:
            load_environment(spec)
        except ConfigError as exc:
            problems.append(f"'task.environment': {exc}")
    specs = cfg.rewards.functions or (list(task.default_rewards) if task else [])
    columns = ["answer", *task.train[0].columns, "completion_ids", "max_completion_length"] if task else []
    for spec in specs:
        try:
            rewards[spec] = load_reward(spec)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if task is not None and (problem := reward_signature_problem(spec, rewards[spec], columns)):
            problems.append(problem)
    if task is not None and (
        problem := gate_problem(cfg, [reward_name(s) for s in specs], task.default_rewards[0])
    ):
        problems.append(problem)
    from graft.tracking import TRACKER_PACKAGES

    for name in cfg.logging.report_to:
        module = TRACKER_PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            problems.append(
                f"'logging.report_to': {name} is not installed; pip install 'graft[tracking]' "
                f"(or pip install {module}), or drop it from report_to"
            )
    model_problem = model_location_problem(cfg.model.name)
    if model_problem:
        problems.append(f"'model.name': {model_problem}")
    if cfg.model.adapter and cfg.sft.enabled:
        problems.append(
            "'model.adapter' and 'sft.enabled' both give the starting adapter; with sft.enabled the "
            "run trains its own warm-up (in <run>/sft), so drop one of them"
        )
    elif cfg.model.adapter and (adapter_problem := adapter_location_problem(cfg.model.adapter)):
        problems.append(f"'model.adapter': {adapter_problem}")
    if cfg.sft.enabled and task is not None:  # the warm-up's data, before anything trains
        from graft.training.sft import sft_examples

        try:
            sft_examples(cfg, task)
        except ConfigError as exc:
            problems.append(str(exc))
    resume_changes: list[str] = []
    try:
        run, resume_from = RunDir.for_config(cfg)
        notes.extend(run.notes)
        if resume_from is not None:  # before anything is written: may this config continue that run?
            from graft.checks.resume import resume_problems
            from graft.training.run import step_of

            refused, resume_changes = resume_problems(cfg, run.path, step_of(resume_from))
            problems.extend(refused)
    except RunDirError as exc:
        problems.append(str(exc))
    out = _writable_parent(Path(cfg.logging.output_dir))
    try:  # a real write: permission bits say nothing for root, read-only mounts or /proc
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        problems.append(
            f"'logging.output_dir': cannot write in {out} ({exc.strerror}); choose a folder you can write to"
        )
    device = None
    try:
        device = resolve_device(cfg.model.device)
    except ModelError as exc:
        problems.append(f"'model.device': {exc}")
    if quant_problem := quantization_problem(cfg.model.quantization, device):
        problems.append(f"'model.quantization': {quant_problem}")
    if device is not None and (rollout_problem := backend_problem(cfg, device)):
        problems.append(f"'generation.backend': {rollout_problem}")

    est, config, paths, prompt_tokens = None, None, None, None
    if estimate and model_problem is None and device is not None:
        try:
            model_path = resolve_model_path(cfg.model)
            config, n_params, linears, wrappable = _model_shape(model_path, cfg)
        except (OSError, ValueError, ModelError):
            config = None  # a hub id with no network: the size is unknown until it downloads
    if config is not None:
        from graft.checks.calls import lora_target_problem

        if cfg.lora.enabled and (problem := lora_target_problem(cfg.lora.target_modules, wrappable)):
            problems.append(problem)
        if task is not None:
            fit = _fit_prompts(cfg, task, model_path, config)
            problems.extend(fit.problems)
            notes.extend(fit.notes)
            prompt_tokens = fit.longest
    if device is not None:  # what this machine can run, before anything heavy starts
        paths = plan_fast_paths(cfg, device, config, world=world)
        problems.extend(paths.problems)
    if config is not None:
        est = estimate_memory(cfg, config, n_params, linears, device, paths, prompt_tokens, world=world)
        if est.available and est.total > 0.95 * est.available:
            problems.append(f"not enough memory: a step needs {est.describe()}; {_memory_advice(est, cfg)}")
        free = shutil.disk_usage(out).free
        per_checkpoint = est.parts.get("adapter + Adam", 0) + est.parts.get("grads + Adam", 0)
        per_checkpoint += 0 if cfg.lora.enabled else est.parts["weights"]
        if cfg.train.fsdp:  # the main rank writes every rank's shards
            per_checkpoint *= world
        needed = per_checkpoint * (cfg.checkpoint.keep_last_n + 2)
        if needed > free:
            problems.append(
                f"not enough disk: checkpoints need ~{needed / GiB:.1f} GiB in {out}, {free / GiB:.1f} GiB "
                "free; free space, move logging.output_dir, or lower checkpoint.keep_last_n"
            )
    return Checked(problems, est, task, rewards, paths, notes, resume_changes)


def _fit_prompts(cfg: Config, task: Task, model_path: str, config):
    """graft.checks.prompts on the tokenizer alone (no weights); a tokenizer that does not load is a problem."""
    from graft.checks.prompts import PromptFit, context_length, fit_prompts
    from graft.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_path, cfg.model)
        return fit_prompts(cfg, task, tokenizer, context_length(config), f"model {cfg.model.name}")
    except ConfigError as exc:
        return PromptFit(0, None, [str(exc)])
    except Exception as exc:  # a damaged tokenizer file, a template that fails on these messages
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        return PromptFit(
            0, None, [f"'model.name': cannot measure the prompts with the tokenizer of {cfg.model.name} "
                      f"({type(exc).__name__}: {reason}); check its tokenizer files and chat template"]
        )  # fmt: skip


def validate_or_raise(cfg: Config, world: int = 1) -> Checked:
    """Every problem `_check` finds for a run in `world` processes, raised at once as a ConfigError."""
    checked = _check(cfg, world=world)
    if checked.problems:
        raise ConfigError(
            f"{len(checked.problems)} problem(s) found before loading the model:\n"
            + "\n".join(f"  - {p}" for p in checked.problems)
        )
    return checked


def plan_for_gpu(cfg: Config, gpu_gib: float, world: int = 1) -> tuple[MemoryEstimate, str]:
    """(estimate, verdict) for running `cfg` on a CUDA GPU with `gpu_gib` GiB, from anywhere: a planning
    question (`graft validate --gpu-memory 24`), answered from the model's config.json alone. model.dtype
    auto counts as bfloat16, as it loads on a GPU that has it. `world`: processes, one per such GPU."""
    from graft.models import ModelError, model_location_problem, resolve_model_path

    if problem := model_location_problem(cfg.model.name):
        raise ConfigError(f"'model.name': {problem}")
    if problems := fsdp_problems(cfg, world):
        raise ConfigError("; ".join(problems))
    if cfg.model.dtype == "auto":
        cfg = cfg.model_copy(deep=True)
        cfg.model.dtype = "bfloat16"
    try:
        config, n_params, linears, _ = _model_shape(resolve_model_path(cfg.model), cfg)
    except (OSError, ValueError, ModelError) as exc:
        raise ConfigError(
            f"cannot read the config of {cfg.model.name} ({str(exc).strip().splitlines()[-1][:200]}); the "
            "plan needs only its config.json: point model.name at a folder that holds it"
        ) from exc
    device = torch.device("cuda")
    paths = plan_fast_paths(cfg, device, config, world=world)
    est = estimate_memory(
        cfg, config, n_params, linears, device, paths, available=int(gpu_gib * GiB), world=world
    )
    label = f"{cfg.model.name} ({n_params / 1e9:.1f}B parameters, {cfg.model.dtype}, quantization {cfg.model.quantization})"
    if world > 1:
        label += f", per GPU of {world}" + (" (train.fsdp: sharded)" if cfg.train.fsdp else "")
    if est.total <= 0.95 * est.available:
        return est, f"fits: {label} needs {est.describe()}"
    return est, f"does not fit: {label} needs {est.describe()}; {_memory_advice(est, cfg)}"
