"""vLLM as graft's rollout engine: a colocated `vllm.LLM` (same process, same GPU as training) fed token ids,
returning a graft Rollout exactly like graft.rollout.sampler.sample does.

vLLM is an optional extra and is imported only inside VllmBackend's methods: importing this module is safe
on a machine without it (tests/fakes/fake_vllm.py stands in for it in the CPU tests).

Choices, and why:
- Weights: after each optimizer step the policy's weights, LoRA merged in (graft.models.merged_state), are
  loaded into the engine's model with `model.load_weights` through `LLM.apply_model`, and the prefix cache is
  reset (its KV was computed with the old weights). A merged load rather than vLLM's LoRA adapters: one code
  path for LoRA and full fine-tuning, 4-bit bases need de-quantized weights anyway, and no adapter ids,
  adapter files or max_lora_rank to manage. After the first (full) load only the adapted layers go over.
- Log-probs: the engine is built with logprobs_mode="processed_logprobs". vLLM's default, "raw_logprobs", is
  log_softmax of the logits before temperature (and any other processor); "processed" is after temperature,
  penalties, min_tokens and top-k/top-p (vLLM docs, engine args --logprobs-mode; vllm/v1/sample/sampler.py
  and ops/topk_topp_sampler.py). graft's trainer uses log_softmax(logits / T) before top-p, so the two agree
  only with top_p = 1 and min_new_tokens = 0: other settings are refused (vllm_sampling_problem).
- Groups: G copies of each prompt with n=1 and a seed per copy drawn from graft's generator, not n=G: the
  seeds are explicit whatever vLLM does with n (its fan-out derives child seeds itself), and the prefix
  cache shares the prompt's prefill between the copies anyway.
- Stops: ignore_eos=True with stop_token_ids = graft's stop ids, so the engine stops on exactly graft's set
  (not on extra ids from the model's generation config); masks and truncation flags are then built from the
  token ids, as graft's sampler builds them.
"""

from __future__ import annotations

import os

import torch

from graft.batch import Rollout
from graft.config import Config
from graft.models import merged_state
from graft.rollout.sampler import completion_mask_from_ids, left_pad

LOGPROBS_MODE = "processed_logprobs"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_sampling_problem(top_p: float, min_new_tokens: int) -> str | None:
    """Why vLLM's log-probs would not be graft's sampling log-probs under these settings (None: they are)."""
    if top_p < 1.0:
        return (
            f"generation.top_p={top_p} with generation.backend=vllm: vLLM reports log-probs of the top-p-"
            "filtered distribution, graft's trainer of the whole one, so every ratio would be off; use "
            "generation.top_p=1.0 or generation.backend=graft"
        )
    if min_new_tokens > 0:
        return (
            f"generation.min_new_tokens={min_new_tokens} with generation.backend=vllm: vLLM's log-probs "
            "leave out the held-back stop tokens, graft's trainer does not; use min_new_tokens=0 or "
            "generation.backend=graft"
        )
    return None


def _request_seeds(n: int, generator: torch.Generator | None) -> list[int | None]:
    """One seed per request from graft's generator, so a run's seed fixes its rollouts (None: unseeded)."""
    if generator is None:
        return [None] * n
    return torch.randint(0, 2**31 - 1, (n,), generator=generator, device=generator.device).tolist()


class VllmBackend:
    """Samples with a vllm.LLM that holds its own copy of the policy's weights (sync_weights refreshes it)."""

    name = "vllm"

    def __init__(self, llm, *, sleep: bool = False):
        self.llm = llm
        self.sleep_between_rollouts = sleep
        self.version = 0  # weight loads so far; 0 = the engine still holds what it read from disk
        self.loaded_names: list[list[str]] = []  # the names each load sent (for tests and the benchmark)
        self._asleep: set[str] = set()  # engine memory released by sleep(): "weights", "kv_cache"

    @classmethod
    def create(cls, model_path: str, cfg: Config, dtype: torch.dtype) -> VllmBackend:
        """A colocated engine for the model at `model_path` (a folder or hub id, as resolve_model_path gives)."""
        # The engine core in this process: apply_model then reaches the live model directly, so the weights
        # are copied GPU to GPU, never pickled to a separate engine process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        g = cfg.generation
        llm = LLM(
            model=model_path,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=_DTYPES[dtype],
            seed=cfg.train.seed,
            gpu_memory_utilization=g.gpu_memory_utilization,
            max_model_len=g.vllm_max_model_len,
            enable_sleep_mode=g.vllm_sleep,
            enable_prefix_caching=True,
            logprobs_mode=LOGPROBS_MODE,
            # vLLM's neutral sampling defaults, not the model's generation_config.json (Qwen2.5-Instruct's sets
            # top_p 0.8 and repetition_penalty 1.05): graft sets every sampling parameter it means
            generation_config="vllm",
        )
        return cls(llm, sleep=g.vllm_sleep)

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    @torch.no_grad()
    def sync_weights(self, policy) -> None:
        """Load the policy's current weights (LoRA merged) into the engine; call after every optimizer step."""
        state, adapted = merged_state(policy)
        if self.version > 0 and adapted is not None:
            # only the LoRA-adapted layers change between steps; everything else went over in the first load
            # (which also covers a base that differs from the files: a folded adapter, a de-quantized base)
            state = {name: state[name] for name in sorted(adapted)}
        weights = list(state.items())
        self._wake("weights")  # weights only: the KV cache stays released until the next rollout
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prompt KV came from the old weights
        self.loaded_names.append([name for name, _ in weights])
        self.version += 1

    @torch.no_grad()
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
        """`group_size` completions per prompt, as graft.rollout.sampler.sample returns them (entropy None:
        vLLM reports the sampled token's log-prob only). `policy` only says where the tensors go."""
        if problem := vllm_sampling_problem(top_p, min_new_tokens):
            raise ValueError(problem)
        rows = [list(p) for p in prompts for _ in range(group_size)]  # a group's completions adjacent
        outputs = self._generate(rows, [max_new_tokens] * len(rows), stop_ids, temperature, greedy, generator)
        self.rest()
        device = getattr(policy, "device", torch.device("cpu"))
        return assemble_rollout(prompts, outputs, group_size, pad_id, stop_ids, device)

    @torch.no_grad()
    def complete(
        self,
        sequences: list[list[int]],
        max_new_tokens: list[int],
        *,
        stop_ids: list[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[tuple[list[int], list[float]]]:
        """One completion of each token sequence, with its own length limit: (ids, log-probs), checked as
        sample's are. Multi-turn episodes (graft.rollout.episodes) continue every live conversation once
        per turn; the prefix cache holds the turns before. The engine stays awake: rest() after the last."""
        outputs = self._generate(sequences, max_new_tokens, stop_ids, temperature, greedy, generator)
        return [_completion(out, set(stop_ids)) for out in outputs]

    def rest(self) -> None:
        """The rollout is over: with generation.vllm_sleep, release the engine's memory until the next."""
        if self.sleep_between_rollouts:
            self.llm.sleep(level=1)  # level 1: weights to CPU (kept), KV cache freed
            self._asleep = {"weights", "kv_cache"}

    def _generate(self, rows, max_tokens, stop_ids, temperature, greedy, generator) -> list:
        """vLLM's RequestOutputs for token rows, one request each, in order."""
        if self.version == 0:
            raise RuntimeError(
                "a VllmBackend rollout before sync_weights: the engine holds the weights it read from disk, "
                "which need not be the policy's (a folded adapter, a de-quantized base)"
            )
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,  # vLLM: 0 = greedy, log-probs at T = 1
                top_p=1.0,
                max_tokens=limit,
                stop_token_ids=list(stop_ids),
                ignore_eos=True,
                logprobs=0,  # the sampled token's log-prob only
                seed=seed,
                detokenize=False,  # graft decodes the ids itself where it needs text
            )
            for limit, seed in zip(max_tokens, _request_seeds(len(rows), generator), strict=True)
        ]
        self._wake("weights")
        self._wake("kv_cache")
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in rows], params, use_tqdm=False)


def _completion(output, stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """(token ids, their log-probs) of a RequestOutput's single completion, checked against graft's rules."""
    (completion,) = output.outputs
    ids = [int(t) for t in completion.token_ids]
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a completion with finish_reason={completion.finish_reason!r}")
    if completion.finish_reason == "stop" and (not ids or ids[-1] not in stop_ids):
        raise RuntimeError(
            f"vLLM stopped a completion on {completion.stop_reason!r}, which is not one of graft's stop "
            f"tokens {sorted(stop_ids)}: its mask and truncation flag would be wrong"
        )
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no log-prob for some sampled tokens (SamplingParams.logprobs=0)")
    return ids, [float(step[t].logprob) for step, t in zip(completion.logprobs, ids, strict=True)]


def assemble_rollout(
    prompts: list[list[int]],
    outputs: list,  # (N * G,) vllm RequestOutputs, in request order
    group_size: int,
    pad_id: int,
    stop_ids: list[int],
    device: torch.device,
) -> Rollout:
    """A Rollout from vLLM's outputs, padded and masked exactly as graft.rollout.sampler.sample does."""
    completions = [_completion(out, set(stop_ids)) for out in outputs]
    B, T = len(completions), max(len(ids) for ids, _ in completions)
    completion_ids = torch.full((B, T), pad_id, dtype=torch.long)
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    for row, (ids, lps) in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[row, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
    # Truncation from the ids (no stop token), as graft's sampler decides it: a stop token drawn as the
    # last allowed token is a finished completion whatever finish_reason the engine gives it.
    completion_mask, has_stop = completion_mask_from_ids(completion_ids, stop_ids)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0).to(device),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0).to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        logprobs=(logprobs * completion_mask).to(device),
        truncated=(~has_stop).to(device),
        group_size=group_size,
        entropy=None,
        sampler="vllm",
    )
