"""Which fast paths a run takes on this machine, decided once from the config and the CPU probe.

`graft validate` (memory estimate, refusals before loading), `graft train` (what it builds, the line it
prints at start) and `graft doctor` all read the same plan, so they cannot disagree. Before loading it
answers from the config (and the model's config where it is on disk); `graft train` asks again with the
loaded model, which adds what only the model shows (its module layout, which layers carry LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graft.config import Config
from graft.cpu.probe import CpuCapabilities, probe
from graft.tasks import environment_spec

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FastPaths:
    device: str
    policy_dtype: torch.dtype  # the trained weights
    sampling_dtype: torch.dtype  # the weights the rollout samples from
    sampling_copy: bool  # the rollout samples from its own copy of the policy (graft.cpu.sampling)
    pack: bool  # that copy's products run on oneDNN-packed weights
    own_decoder: bool | None  # graft's Llama-family decoder (None: the model's shape is not known yet)
    replay: bool | None  # the update replays the rollout's forward (None: depends on the model)
    why: dict[str, str] = field(default_factory=dict)  # path -> why it is on or off
    problems: list[str] = field(default_factory=list)  # settings this machine cannot run, each with its fix

    def report_lines(self) -> list[str]:
        """What a run prints at start: the CPU's answer to the probe (on a CPU) and the paths taken."""
        cpu = [f"cpu: {probe().summary()}"] if self.device == "cpu" else []
        return [*cpu, f"paths: {self.describe()}"]

    def describe(self) -> str:
        """One line for the start of a run and for `graft doctor`."""
        on = []
        if self.sampling_copy:
            kind = "graft's decoder" if self.own_decoder else "a copy of the model"
            on.append(
                f"rollout through {kind} on {'packed ' if self.pack else ''}{_name(self.sampling_dtype)} weights"
            )
        else:
            on.append(f"rollout through the model in {_name(self.policy_dtype)}")
        on.append("replayed update" if self.replay else "two-pass update")
        off = [f"{path}: {reason}" for path, reason in self.why.items() if reason.startswith("off")]
        return "; ".join(on) + (f" ({'; '.join(off)})" if off else "")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolve(name: str, device: torch.device, default: torch.dtype) -> torch.dtype:
    from graft.models import resolve_dtype

    return default if name == "auto" else resolve_dtype(name, device)


def replay_config_problem(
    cfg: Config, policy_dtype, sampling_dtype, own_decoder: bool, lora: bool, world: int = 1
) -> str | None:
    """Why a run with this config cannot replay the rollout's forward in its update; None when it can
    (the model-level part, which LoRA layers exist, is graft.cpu.replay.replay_model_problem's).
    `world`: data-parallel processes; each records and replays its own share of the batch."""
    g, t = cfg.grpo, cfg.train
    batch = t.prompts_per_step // world * g.num_generations
    if not t.replay:
        return "train.replay=false"
    if t.gradient_checkpointing:
        return "train.gradient_checkpointing=true (the replay keeps every layer's inputs; checkpointing keeps none)"
    if g.num_iterations != 1 or g.num_minibatches != 1:
        return "the batch outlives an update (grpo.num_iterations or grpo.num_minibatches > 1)"
    if t.micro_batch_size < batch:
        return f"train.micro_batch_size ({t.micro_batch_size}) is below the batch ({batch}): the recording holds it all"
    if not own_decoder:
        return "the rollout does not run graft's own decoder (CPU, generation.pack_weights, a Llama-shaped model)"
    if (policy_dtype, sampling_dtype, t.autocast) not in (
        (torch.float32, torch.float32, "none"),
        (torch.float32, torch.bfloat16, "bfloat16"),
    ):
        return (
            f"weights {policy_dtype}, sampling {sampling_dtype}, train.autocast={t.autocast}: the replay "
            "needs float32 throughout or bfloat16 sampling with bfloat16 autocast"
        )
    if not lora:
        return "full fine-tuning (the replay trains LoRA factors)"
    return None


def plan_fast_paths(
    cfg: Config,
    device: torch.device,
    model_config=None,
    caps: CpuCapabilities | None = None,
    model=None,
    world: int = 1,
) -> FastPaths:
    """The paths this run takes. `model_config` (a transformers config) says whether graft's decoder fits
    the model; without it own_decoder and replay are None (unknown) where they depend on it. `model`, the
    loaded policy (LoRA added), also settles what its modules decide; its dtype is then the policy's."""
    from graft.cpu.decoder import config_problem, decoder_problem
    from graft.cpu.replay import replay_model_problem

    gen, t = cfg.generation, cfg.train
    if model is not None:
        model_config = model.config
    policy_dtype = model.dtype if model is not None else _resolve(cfg.model.dtype, device, torch.float32)
    sampling_dtype = _resolve(gen.dtype, device, policy_dtype)
    why, problems = {}, []
    cpu = device.type == "cpu"
    if cpu:
        caps = caps or probe()
        # 16-bit products without oneDNN kernels fall to a reference kernel: tens of times slower than float32
        for key, value in (
            ("model.dtype", cfg.model.dtype),
            ("generation.dtype", gen.dtype),
            ("train.autocast", t.autocast),
        ):
            if value in HALF and not caps.has(value):
                problems.append(
                    f"{key}={value}: this CPU cannot run {value} products at speed: {caps.missing(value)}; "
                    f"use {key}={'none' if key == 'train.autocast' else 'float32'} (float32 is faster here)"
                )
    quantized = cfg.model.quantization != "none"
    episodes = environment_spec(cfg.task) is not None
    if quantized or episodes or t.fsdp:  # bitsandbytes' layers compute from their packed weights; episodes
        # need the model's own cache across turns (graft.rollout.episodes); FSDP's weights are shards
        # gathered per rollout (graft.training.fsdp): no sampling copy, no replay
        if quantized:
            off = f"off: model.quantization={cfg.model.quantization} (bitsandbytes weights)"
        elif episodes:
            off = "off: multi-turn episodes sample through the model (graft.rollout.episodes)"
        else:
            off = "off: train.fsdp samples the gathered shards through the model (graft.training.fsdp)"
        why = {"packed weights": off, "graft decoder": off, "replayed update": off}
        return FastPaths(device.type, policy_dtype, policy_dtype, False, False, False, False, why, problems)
    sampling_copy = (gen.pack_weights and cpu) or sampling_dtype != policy_dtype
    pack = gen.pack_weights and cpu
    if not gen.pack_weights:
        why["packed weights"] = "off: generation.pack_weights=false"
    elif not cpu:
        why["packed weights"] = f"off: oneDNN packing is for CPUs (device {device.type})"
    else:
        feature = "packed_float32" if sampling_dtype == torch.float32 else _name(sampling_dtype)
        pack = caps.has(feature)
        why["packed weights"] = "on" if pack else f"off: {caps.missing(feature)}"
    own_decoder = None
    if not (gen.pack_weights and cpu):
        own_decoder = False
        why["graft decoder"] = "off: CPU runs with generation.pack_weights only"
    elif model_config is not None:
        problem = config_problem(model_config)
        if problem is None and model is not None:
            problem = decoder_problem(model.get_base_model() if hasattr(model, "get_base_model") else model)
        own_decoder = problem is None
        why["graft decoder"] = "on" if own_decoder else f"off: {problem}"
    replay = None
    if own_decoder is not None:
        problem = replay_config_problem(
            cfg, policy_dtype, sampling_dtype, own_decoder, cfg.lora.enabled, world
        )
        if problem is None and model is not None:
            problem = replay_model_problem(model)
        replay = problem is None
        why["replayed update"] = "on" if replay else f"off: {problem}"
    return FastPaths(
        device.type, policy_dtype, sampling_dtype, sampling_copy, pack, own_decoder, replay, why, problems
    )
