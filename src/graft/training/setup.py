"""What a GRPO step uses that is built once per run: a leaf of graft.training (the step, the scoring, the
episodes and the loop all read it; graft.training.loop.setup_training builds it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from graft.config import Config
from graft.cpu.fast_path import FastPath
from graft.envs.base import Environment
from graft.rewards.runtime import RewardRuntime
from graft.rollout.backends import RolloutBackend
from graft.tasks import Task
from graft.training.averaging import WeightAverage
from graft.training.distributed import SINGLE, Ranks
from graft.training.entropy_control import EntropyControl


@dataclass
class StepSetup:
    """Everything a GRPO step uses that is built once per run (graft.training.loop.setup_training)."""

    cfg: Config
    task: Task
    policy: torch.nn.Module  # LoRA-wrapped when lora.enabled
    tokenizer: object
    stop_ids: list[int]
    rewards: RewardRuntime  # the run's reward functions
    reward_weights: list[float]  # one per reward function
    correctness_name: str  # the task's correctness reward, logged as accuracy even when not trained on
    correctness: object  # its scorer, (prompts, completions, **columns) -> list[float]
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[torch.nn.Parameter]  # the trained parameters
    generator: torch.Generator  # the rollouts' random sequence (checkpointed)
    device: torch.device
    fast_path: FastPath | None  # graft.cpu: sampling copy and replayed update, when the plan takes them
    ref_model: torch.nn.Module | None  # full fine-tuning with beta > 0; LoRA uses the adapter-off policy
    backend: RolloutBackend  # graft's sampler, or a vLLM engine on a GPU (graft.rollout.backends)
    ranks: Ranks = SINGLE  # data-parallel processes (graft.training.distributed); one by default
    # multi-turn tasks: makes one environment per episode (graft.envs); None = single-turn completions
    environment: Callable[[], Environment] | None = None
    # the entropy bonus's weight, adapted step by step (grpo.entropy_target); made from cfg when not given
    entropy_control: EntropyControl | None = None
    # train.ema_decay: the averaged weights that evaluations and the final model use; made from cfg
    weight_average: WeightAverage | None = None

    def __post_init__(self):
        if self.entropy_control is None:
            self.entropy_control = EntropyControl(self.cfg.grpo)
        if self.weight_average is None:
            self.weight_average = WeightAverage(self.params, self.cfg.train.ema_decay)
