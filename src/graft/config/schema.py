"""The config sections: every field has a default and a one-line help (its `description`), so
`graft config` can print the whole tree and a recipe only has to name what it changes.
"""

from __future__ import annotations

import math
import re
import string
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys ({"grpo": {"beta": 0.1}} -> {"grpo.beta": 0.1})."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ConfigError(ValueError):
    """A config problem the user must fix; the message lists every problem found and how to fix it."""


class _Section(BaseModel):
    # allow_inf_nan=False: `nan` or `inf` in any float (a weight, a rate, a threshold) is refused by key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field(
        "builtin:smollm2-135m-instruct",
        description="policy model: 'builtin:smollm2-135m-instruct', a hub id (org/name) or a local folder",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) for hub ids")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto = float32 on CPU, bfloat16 on GPUs that support it"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="load the base weights quantized with bitsandbytes (4bit = NF4 + double quantization, "
        "computing in model.dtype) and train a LoRA adapter on them (QLoRA); needs graft[quant]",
    )
    cache_dir: str | None = Field(
        None, description="where built-in models are cached as safetensors (default ~/.cache/graft)"
    )
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub")
    adapter: str | None = Field(
        None,
        description="LoRA adapter folder folded into the model at load, e.g. runs/<sft run>/final "
        "(train from an SFT warm-up)",
    )


class LoraConfig(_Section):
    enabled: bool = Field(True, description="train a LoRA adapter; false = full fine-tuning")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names (q_proj, v_proj, ...)"
    )


class TaskConfig(_Section):
    name: Literal["arithmetic", "countdown", "jsonl", "gsm8k", "math", "hub", "wordle"] = Field(
        "arithmetic", description="which task supplies prompts and answers (wordle: multi-turn games)"
    )
    environment: str | None = Field(
        None,
        description="multi-turn episodes: 'wordle', 'guess_number' or your own 'file.py:Class' (an "
        "Environment); each task row starts one episode (default: the task's own, wordle's for wordle)",
    )
    seed: int = Field(
        1234, description="seed for generating or shuffling problems (independent of train.seed)"
    )
    path: str | None = Field(
        None,
        description="jsonl: the file; gsm8k/math/hub: a local copy (.jsonl, .json, .parquet or a saved folder)",
    )
    eval_path: str | None = Field(
        None, description="jsonl: a separate held-out file (default: split off path)"
    )
    dataset: str | None = Field(None, description="hub dataset id (gsm8k and math have defaults)")
    dataset_config: str | None = Field(None, description="hub dataset configuration name")
    train_split: str = Field("train", description="split trained on")
    eval_split: str | None = Field("test", description="split evaluated on (null: hold out part of train)")
    prompt_column: str | None = Field(None, description="column holding the prompt (default: the task's own)")
    answer_column: str | None = Field(
        None, description="column holding the gold answer (default: the task's own)"
    )
    prompt_format: Literal["plain", "reasoning", "think"] = Field(
        "plain", description="ask for <reasoning>/<think> ... </...><answer> ... </answer>, or nothing"
    )
    num_numbers: int = Field(4, ge=2, le=6, description="countdown: how many numbers to combine")
    num_train: int = Field(2000, ge=1, description="number of training problems")
    num_eval: int = Field(64, ge=1, description="number of held-out problems (never overlap training ones)")
    min_operand: int = Field(0, description="smallest operand (arithmetic)")
    max_operand: int = Field(20, description="largest operand (arithmetic)")
    operations: list[Literal["+", "-", "*"]] = Field(["+", "-"], description="operations to draw from")
    templates: list[str | dict[Literal["+", "-", "*"], str]] = Field(
        ["What is {a} {op} {b}?"],
        description="arithmetic: phrasings with {a}, {b}, {op} (+) or {op_word} (plus), or one per operation "
        "as {'+': ..., '-': ...}; every training problem is asked in each; held-out in the first",
    )
    unseen_templates: list[str | dict[Literal["+", "-", "*"], str]] = Field(
        [],
        description="arithmetic: phrasings never trained on; the held-out problems asked in them are "
        "evaluated too (report row 'greedy accuracy, unseen phrasing')",
    )
    system_prompt: str | None = Field(
        "default",
        description="system message through the chat template: 'default' = the task's own, null = none",
    )
    long_prompts: Literal["error", "truncate", "drop"] = Field(
        "error",
        description="prompts longer than the model's context minus generation.max_new_tokens: refuse the "
        "run (naming them), keep their end (truncate, as TRL does), or drop them",
    )

    @model_validator(mode="after")
    def _check_range(self) -> TaskConfig:
        if self.min_operand > self.max_operand:
            raise ValueError(
                f"min_operand ({self.min_operand}) is larger than max_operand ({self.max_operand}); swap them"
            )
        if not self.operations:
            raise ValueError("operations is empty; list at least one of '+', '-', '*'")
        for key in ("templates", "unseen_templates"):
            for template in getattr(self, key):
                for text in template.values() if isinstance(template, dict) else [template]:
                    _check_template(key, text)
        if not self.templates:
            raise ValueError("templates is empty; give at least one phrasing, e.g. 'What is {a} {op} {b}?'")
        if shared := [u for u in self.unseen_templates if u in self.templates]:
            raise ValueError(
                f"unseen_templates {shared} are also in templates; an unseen phrasing must not be trained on"
            )
        first = self.templates[0]
        if isinstance(first, dict) and (missing := [op for op in self.operations if op not in first]):
            raise ValueError(
                f"templates[0] asks the held-out problems, so it needs every operation; it has none for "
                f"{missing}: add them, or put a plain phrasing with {{op}} first"
            )
        return self


def _check_template(key: str, text: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:  # "{a" and the like
        raise ValueError(
            f"{key}: {text!r} is not a valid phrasing ({err}); write placeholders as {{a}}"
        ) from None
    if unknown := fields - {"a", "b", "op", "op_word"}:
        raise ValueError(
            f"{key}: {text!r} uses {sorted(unknown)}; a phrasing may use {{a}}, {{b}}, {{op}} and {{op_word}}"
        )
    if not {"a", "b"} <= fields:
        raise ValueError(f"{key}: {text!r} must contain both {{a}} and {{b}} (the operands)")


class EpisodeConfig(_Section):
    max_turns: int = Field(6, ge=1, description="model turns per episode at most")
    max_episode_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens after the prompt per episode (model + environment) at most; null = no cap",
    )
    env_timeout: float | None = Field(
        30.0,
        gt=0,
        description="seconds an environment call may take before its episode fails; null = no limit",
    )
    drop_truncated: bool = Field(
        False, description="leave episodes cut by a limit out of the loss (they still count in the metrics)"
    )


class RewardsConfig(_Section):
    functions: list[str] | None = Field(
        None,
        description="rewards summed with weights: built-in names, path/to/file.py:fn or package.module:fn "
        "(default: the task's own)",
    )
    weights: list[float] | None = Field(None, description="one weight per function (default: all 1.0)")
    timeout: float = Field(
        10.0, gt=0, description="seconds one call of a user reward may take before it is killed"
    )
    num_workers: int = Field(2, ge=1, description="worker processes for user rewards (run in parallel)")
    on_error: Literal["exclude", "zero"] = Field(
        "exclude",
        description="a failed or timed-out call: exclude it from the baseline (like None) or score 0",
    )
    max_failure_rate: float = Field(
        0.5, ge=0, le=1, description="stop the run when a reward fails in more than this share of its calls"
    )
    completion_format: Literal["messages", "text"] = Field(
        "messages", description="completions given to user rewards: chat messages (as TRL does) or plain text"
    )

    @model_validator(mode="after")
    def _check_weights(self) -> RewardsConfig:
        if self.functions is not None and not self.functions:
            raise ValueError("functions is empty; name at least one reward, e.g. [last_integer], or null")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"weights must be finite numbers, got {self.weights}")
        if (
            self.weights is not None
            and self.functions is not None
            and len(self.weights) != len(self.functions)
        ):
            raise ValueError(
                f"weights has {len(self.weights)} entries but functions has {len(self.functions)}; "
                "give one weight per function"
            )
        return self


class GrpoConfig(_Section):
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group size G)")
    beta: float = Field(
        0.0, ge=0, description="KL coefficient to the reference model (0 = no reference pass)"
    )
    epsilon: float = Field(0.2, gt=0, description="lower clip range of the importance ratio")
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clip range (clip-higher); default epsilon"
    )
    delta: float | None = Field(
        None, gt=1, description="optional upper bound on the unclipped ratio (two-sided)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group std, the batch std, or not at all"
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="how per-token losses are averaged (see algo/losses.py)"
    )
    advantage: Literal["group", "w_reinforce"] = Field(
        "group",
        description="group: each reward against its group's mean (GRPO); w_reinforce: no baseline, a "
        "right completion pushed up by positive_weight, a wrong one down by 1 (rewards in [0, 1])",
    )
    positive_weight: float = Field(
        0.1, gt=0, description="w_reinforce: the weight lambda of right completions (wrong ones: 1)"
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="importance ratio per token, or one per sequence (GSPO)"
    )
    num_iterations: int = Field(1, ge=1, description="policy updates per rollout batch (mu)")
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per iteration over the rollout batch")
    dynamic_sampling: bool = Field(
        False,
        description="DAPO: train only on groups whose rewards differ, drawing more prompts until "
        "train.prompts_per_step such groups (or grpo.max_sampling_rounds rollouts)",
    )
    max_sampling_rounds: int = Field(
        3, ge=1, description="dynamic sampling: rollouts per step at most (the first included)"
    )
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="weight of an entropy bonus on the sampled tokens (graft.algo.entropy); with "
        "entropy_target, its starting value",
    )
    entropy_target: float | None = Field(
        None,
        gt=0,
        description="adaptive entropy control: mean token entropy (nats, at the sampling temperature) to "
        "hold; the bonus's weight rises by entropy_coef_step a step below it, falls back above it",
    )
    entropy_coef_step: float = Field(
        0.005, gt=0, description="entropy_target: change of the entropy bonus's weight per step"
    )
    entropy_coef_max: float = Field(
        0.1, gt=0, description="entropy_target: the entropy bonus's weight at most"
    )
    tis_cap: float | None = Field(
        2.0,
        ge=1,
        description="truncated importance sampling against the rollout engine's numerics (vLLM): each "
        "token's loss is weighted by min(pi_trainer / pi_sampler, tis_cap); null = no correction",
    )

    @model_validator(mode="after")
    def _check_estimator(self) -> GrpoConfig:
        if self.advantage == "w_reinforce" and self.dynamic_sampling:
            raise ValueError(
                "dynamic_sampling drops the groups whose rewards agree, and those are what advantage="
                "w_reinforce learns from (it has no group baseline); use one of the two"
            )
        if self.entropy_target is not None and self.entropy_coef > self.entropy_coef_max:
            raise ValueError(
                f"entropy_coef={self.entropy_coef} is above entropy_coef_max={self.entropy_coef_max}; "
                "raise entropy_coef_max or lower entropy_coef"
            )
        return self


class GenerationConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, description="completion length limit (longer ones are truncated)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use the same one)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold")
    min_new_tokens: int = Field(
        0, ge=0, description="hold stop tokens back until this many tokens (benchmarks)"
    )
    merge_adapter: bool = Field(
        True, description="sample from LoRA-merged weights (faster; a temporary copy of the adapted layers)"
    )
    pack_weights: bool = Field(
        True,
        description="CPU: sample from a copy of the merged policy with oneDNN-packed weights (where the CPU "
        "probe finds oneDNN can pack them; else the same copy on F.linear); Llama-family "
        "models (Llama, SmolLM, Qwen2, Mistral) through graft's own fused forward (same math up to "
        "summation order). Between rollouts it keeps only the LM head (other models: a model copy)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights the rollout samples from; auto = the model's. bfloat16 on a float32 model = a "
        "bf16 copy of the merged policy (faster decoding where oneDNN has bf16 kernels, refused on CPUs "
        "without them: see graft doctor; training stays float32)",
    )
    backend: Literal["auto", "graft", "vllm"] = Field(
        "auto",
        description="rollout engine: graft's own sampler, vLLM (a CUDA GPU and pip install 'graft[vllm]'), "
        "or auto = vLLM where both are present and the settings allow it, graft's sampler otherwise",
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="vLLM: share of the GPU's memory the colocated engine takes (weights + KV cache)",
    )
    vllm_sleep: bool = Field(
        False,
        description="vLLM: between rollouts offload the engine's weights to CPU and free its KV cache (more "
        "memory for training, slower steps)",
    )
    vllm_max_model_len: int | None = Field(
        None,
        ge=1,
        description="vLLM: longest prompt + completion the engine serves; null = the model's context",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        return self


class TrainConfig(_Section):
    seed: int = Field(0, description="seed for sampling, LoRA init and prompt order")
    max_steps: int = Field(30, ge=1, description="GRPO steps (one rollout batch each)")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="also end the run (final save and evaluation) once its steps took this long, loading "
        "and evaluation not counted; null = max_steps alone",
    )
    prompts_per_step: int = Field(
        2, ge=1, description="prompts per GRPO step; the batch is this x G completions"
    )
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="completions per forward/backward (gradient accumulation); at least the batch lets the "
        "update replay the rollout's forward (train.replay)",
    )
    skip_solved: int = Field(
        0,
        ge=0,
        description="prompt selection by difficulty: a problem whose group scored full marks this many "
        "times in a row rests for train.revisit_after epochs; 0 = every problem every epoch",
    )
    revisit_after: int = Field(1, ge=1, description="train.skip_solved: epochs a solved problem rests")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    warmup_steps: int = Field(2, ge=0, description="linear warmup, in optimizer steps")
    lr_scheduler: Literal["cosine", "constant"] = Field("constant", description="schedule after warmup")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (null = no clipping)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none",
        description="training forward under torch.autocast in this dtype (weights, Adam, loss stay as they "
        "are); bfloat16 on a CPU needs oneDNN's bf16 kernels (AVX512-BW/VL/DQ, AMX or AVX-NE-CONVERT: see "
        "graft doctor) and is refused without them",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations during backward instead of keeping them: far less "
        "memory for big models on GPUs, about a third more compute",
    )
    fsdp: bool = Field(
        False,
        description="full fine-tuning with several processes: shard weights, gradients and AdamW state over "
        "them (torch FSDP2) instead of a whole copy on each; rollouts gather the full weights",
    )
    replay: bool = Field(
        True,
        description="at mu = 1, backpropagate through the activations the rollout computed instead of a "
        "second forward (LoRA, graft's CPU decoder, micro_batch_size >= batch, float32 or bf16 sampling with "
        "bf16 autocast; else two passes)",
    )
    deterministic: bool = Field(
        False, description="deterministic kernels: a resumed run repeats a straight one bit for bit"
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the trained weights with this decay per step; "
        "evaluations and the final model use it, rollouts and updates the live weights (null = off)",
    )
    keep_freed_memory: bool = Field(
        True,
        description="glibc: reuse freed memory instead of returning it to the OS at once (mallopt); "
        "fewer page faults in a CPU step (benchmarks/NOTES.md)",
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="stop after this many GRPO steps in a row whose updates were all non-finite"
    )
    stop_timeout: float | None = Field(
        300.0,
        gt=0,
        description="after Ctrl-C / SIGTERM, seconds the current step may still take before it is aborted "
        "without a checkpoint (a second signal aborts at once; null = wait for the step)",
    )

    @model_validator(mode="after")
    def _check_betas(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must both be in [0, 1), got {list(self.adam_betas)}")
        return self

    @model_validator(mode="after")
    def _check_average(self) -> TrainConfig:
        if self.ema_decay is not None and self.fsdp:
            raise ValueError(
                "ema_decay is not supported with fsdp (the average would be sharded with the weights): "
                "set train.ema_decay=null or train.fsdp=false"
            )
        return self


class EvalConfig(_Section):
    every_n_steps: int = Field(10, ge=0, description="held-out greedy evaluation every N steps (0 = never)")
    at_start: bool = Field(True, description="evaluate before the first step (the baseline)")
    at_end: bool = Field(True, description="evaluate after the last step")
    num_prompts: int | None = Field(None, ge=1, description="held-out prompts to use (default: all)")
    max_new_tokens: int | None = Field(
        None, ge=1, description="length limit for eval (default: generation's)"
    )
    batch_size: int = Field(32, ge=1, description="prompts decoded together")
    num_samples: int = Field(
        0, ge=0, description="completions sampled per problem for pass@k and maj@k (0 = greedy only)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature for pass@k / maj@k samples")
    num_samples_kept: int = Field(
        8, ge=0, description="greedy completions kept in eval.json (before/after samples in the report)"
    )


class SftConfig(_Section):
    enabled: bool = Field(
        False, description="graft train: run the SFT warm-up first (into <run>/sft), then GRPO from it"
    )
    data: str = Field(
        "task",
        description="JSONL of {prompt, completion} or {messages}, or 'task' = worked solutions the task "
        "generates (arithmetic, countdown)",
    )
    max_steps: int = Field(40, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step")
    learning_rate: float = Field(5e-4, gt=0, description="peak learning rate (linear warmup, then constant)")
    warmup_steps: int = Field(2, ge=0, description="linear warmup, in optimizer steps")
    max_length: int = Field(512, ge=8, description="examples longer than this many tokens are cut")


class GateConfig(_Section):
    enabled: bool = Field(
        True, description="probe the model before GRPO and stop if a gated reward is zero on every sample"
    )
    num_prompts: int = Field(
        4, ge=1, description="training prompts probed at a time (grpo.num_generations samples each)"
    )
    max_prompts: int = Field(
        16,
        ge=1,
        description="while a gated reward is still zero on every sample, probe num_prompts more, up to "
        "this many prompts in all, before refusing (a weak model's few right answers are found)",
    )
    rewards: list[str] | None = Field(
        None, description="rewards that must not be all zero (default: correctness and format rewards)"
    )


class CheckpointConfig(_Section):
    every_n_steps: int = Field(10, ge=0, description="save a checkpoint every N steps (0 = only at the end)")
    keep_last_n: int = Field(2, ge=1, description="checkpoints kept on disk (older ones are deleted)")


class LoggingConfig(_Section):
    output_dir: str = Field("runs", description="parent folder of run directories")
    run_name: str | None = Field(
        None,
        description="run directory name, a plain name inside output_dir (default: task name + timestamp)",
    )
    progress: Literal["auto", "bar", "lines"] = Field(
        "auto", description="live progress bar, or one plain line per step (auto: bar on a terminal)"
    )
    print_config: bool = Field(True, description="print the resolved config at start")
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        [], description="trackers besides metrics.jsonl (always written): tensorboard, wandb, trackio, mlflow"
    )
    project: str = Field("graft", description="project / experiment name in wandb, trackio and mlflow")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="wandb offline needs no login or network (sync later with `wandb sync`)"
    )
    mlflow_uri: str | None = Field(None, description="mlflow tracking URI (default: a file store in the run)")
    completions_every: int = Field(10, ge=0, description="print a table of a few completions every N steps")

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, name: str | None) -> str | None:
        if name is not None and (
            not name.strip() or name in (".", "..") or _PATH_CHARS.search(name) or name != name.strip()
        ):
            raise ValueError(
                f"{name!r} must be a plain folder name (no '/', '\\', '..', control characters or "
                "surrounding spaces): the run goes in logging.output_dir/<run_name>; to put it elsewhere "
                "set logging.output_dir"
            )
        return name


_PATH_CHARS = re.compile(r"[/\\\x00-\x1f]")


class HealthConfig(_Section):
    window: int = Field(5, ge=1, description="steps averaged by the windowed alarms")
    truncation_max: float = Field(
        0.5, ge=0, le=1, description="alarm when more completions than this hit the limit"
    )
    zero_variance_max: float = Field(
        0.8, ge=0, le=1, description="alarm when more groups than this have no signal"
    )
    entropy_collapse_ratio: float = Field(
        0.2, ge=0, le=1, description="alarm when token entropy falls below this share of its starting value"
    )
    length_drift_ratio: float = Field(
        2.0, gt=1, description="alarm when mean completion length moves by this factor from its start"
    )
    length_drift_explained_gain: float = Field(
        0.1,
        ge=0,
        description="no length_drift alarm when sampled accuracy rose by at least this meanwhile (the length "
        "change came with learning, e.g. answers losing their padding)",
    )
    kl_max: float = Field(1.0, gt=0, description="alarm when the KL to the reference exceeds this")
    sampler_kl_max: float = Field(
        0.01,
        gt=0,
        description="alarm when a rollout engine's (vLLM's) log-probs drift this far (KL) from the trainer's",
    )
    format_gap: float = Field(
        0.3, gt=0, description="alarm when a format reward rises by this much while accuracy stays flat"
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="policy model")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter (or full fine-tuning)")
    task: TaskConfig = Field(default_factory=TaskConfig, description="prompts with checkable answers")
    episode: EpisodeConfig = Field(default_factory=EpisodeConfig, description="multi-turn episode limits")
    rewards: RewardsConfig = Field(default_factory=RewardsConfig, description="reward functions")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="GRPO algorithm")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="rollout sampling")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimizer and loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation")
    sft: SftConfig = Field(default_factory=SftConfig, description="supervised warm-up (graft sft)")
    gate: GateConfig = Field(default_factory=GateConfig, description="probe before GRPO starts")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="run directory and console")
    health: HealthConfig = Field(default_factory=HealthConfig, description="training-health alarm thresholds")
    resume: str | None = Field(
        None,
        description="'auto' = continue logging.run_name from its latest good checkpoint (or start it), "
        "or the path of a checkpoint folder",
    )

    @model_validator(mode="after")
    def _check_quantization(self) -> Config:
        if self.model.quantization != "none" and not self.lora.enabled:
            raise ValueError(
                f"model.quantization={self.model.quantization} trains a LoRA adapter on frozen quantized "
                "weights; set lora.enabled=true, or model.quantization=none for full fine-tuning"
            )
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> Config:
        batch = self.train.prompts_per_step * self.grpo.num_generations
        if batch % self.grpo.num_minibatches:
            raise ValueError(
                f"the rollout batch ({self.train.prompts_per_step} prompts x {self.grpo.num_generations} "
                f"generations = {batch}) does not split into grpo.num_minibatches={self.grpo.num_minibatches}; "
                "pick a divisor of the batch"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
