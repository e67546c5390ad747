"""A stand-in for the slice of vLLM's public API graft uses, backed by a real (tiny) transformers model so its
tokens and log-probs are real numbers. install(monkeypatch) puts it in sys.modules as `vllm` / `vllm.inputs`.

What it mirrors (vLLM >= 0.10.2, V1 engine):
- LLM(model=<folder>, **engine args): reads the weights from the folder, as vLLM does; unknown engine args are
  a TypeError, so graft cannot pass a name vLLM does not have.
- LLM.generate(prompts=[TokensPrompt(prompt_token_ids=...)], sampling_params=[SamplingParams(...)]) ->
  [RequestOutput(outputs=[CompletionOutput(token_ids, logprobs=[{id: Logprob}], finish_reason, stop_reason)])]
  in request order; the stop token is part of token_ids; seeded requests draw from their own generator,
  child j of an n > 1 request from seed + j.
- logprobs_mode (vllm/v1/sample/sampler.py): "raw_logprobs" (the default) is log_softmax of the logits before
  any processing, so before temperature; "processed_logprobs" is after min_tokens, temperature and top-p.
  Greedy requests (temperature 0) skip temperature, so their processed log-probs are at T = 1.
- A prefix cache: the prompt's last-position logits are kept per prompt and reused until
  reset_prefix_cache(), so a weight load without a reset samples the first token from the old weights.
- LLM.apply_model(fn) -> [fn(model)] where model.load_weights(iterable of (HF name, tensor)) copies them in
  and returns the names loaded; every load is recorded in llm.weight_loads.
- LLM.sleep(level=1) / wake_up(tags=None | ["weights"] | ["kv_cache"]) (needs enable_sleep_mode=True); using
  released memory raises, as it would crash a real engine.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import sys
import types
from dataclasses import dataclass, field
from typing import TypedDict

import torch

ENGINE_ARGS = {
    "revision",
    "trust_remote_code",
    "dtype",
    "seed",
    "gpu_memory_utilization",
    "max_model_len",
    "enable_sleep_mode",
    "enable_prefix_caching",
    "logprobs_mode",
    "enforce_eager",
    "generation_config",
}
_DTYPES = {
    "auto": torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    seed: int | None = None
    detokenize: bool = True


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class FakeModel:
    """What apply_model hands a function: the engine's model, loading weights by their transformers names."""

    hf: torch.nn.Module
    llm: LLM
    loads: list[list[str]] = field(default_factory=list)

    def load_weights(self, weights) -> set[str]:
        if "weights" in self.llm.sleeping:
            raise RuntimeError(
                "load_weights while the engine's weights are asleep: wake_up(['weights']) first"
            )
        params = dict(self.hf.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                if name == "lm_head.weight" and self.hf.config.tie_word_embeddings:
                    continue  # vLLM skips a tied head too
                raise ValueError(f"There is no module or parameter named '{name}' in the model")
            with torch.no_grad():
                params[name].copy_(tensor.to(params[name].dtype))
            loaded.add(name)
        self.loads.append(sorted(loaded))
        return loaded


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        if unknown := set(kwargs) - ENGINE_ARGS:
            raise TypeError(f"fake vLLM: unexpected engine arguments {sorted(unknown)}")
        self.kwargs = kwargs
        self.logprobs_mode = kwargs.get("logprobs_mode", "raw_logprobs")
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[kwargs.get("dtype", "auto")]).eval()
        self.model = FakeModel(hf, self)
        self.eos_token_id = hf.config.eos_token_id
        self.prefix_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.prefix_cache_resets = 0
        self.sleeping: set[str] = set()
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self._default_generator = torch.Generator().manual_seed(kwargs.get("seed") or 0)
        self._ids = itertools.count()

    @property
    def weight_loads(self) -> list[list[str]]:
        return self.model.loads

    # --------------------------------------------------------------------------- engine control

    def apply_model(self, func) -> list:
        return [func(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache.clear()
        self.prefix_cache_resets += 1
        return True

    def sleep(self, level: int = 1) -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("Sleep mode is not enabled (LLM(enable_sleep_mode=True))")
        if level != 1:
            raise NotImplementedError("the fake keeps level-1 semantics only (weights kept, KV cache freed)")
        self.sleeping = {"weights", "kv_cache"}
        self.prefix_cache.clear()  # the KV cache is freed

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.sleeping -= set(tags or ("weights", "kv_cache"))

    # --------------------------------------------------------------------------- generation

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        if self.sleeping:
            raise RuntimeError(f"generate on a sleeping engine ({sorted(self.sleeping)} released)")
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        outputs = []
        for prompt, sp in zip(prompts, sampling_params, strict=True):
            ids = list(prompt["prompt_token_ids"])
            self.requests.append((ids, sp))
            completions = [
                self._complete(ids, sp, j, None if sp.seed is None else sp.seed + j) for j in range(sp.n)
            ]
            outputs.append(RequestOutput(str(next(self._ids)), None, ids, completions))
        return outputs

    @torch.no_grad()
    def _next_logits(self, ids: list[int], is_prompt: bool) -> torch.Tensor:  # (V,) float32
        key = tuple(ids)
        if is_prompt and key in self.prefix_cache:
            return self.prefix_cache[key].clone()
        logits = self.model.hf(torch.tensor([ids])).logits[0, -1].float()
        if is_prompt and self.kwargs.get("enable_prefix_caching", True):
            self.prefix_cache[key] = logits.clone()
        return logits

    def _complete(self, prompt: list[int], sp: SamplingParams, index: int, seed: int | None):
        generator = torch.Generator().manual_seed(seed) if seed is not None else self._default_generator
        stops = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else {self.eos_token_id})
        greedy = sp.temperature < 1e-5
        tokens: list[int] = []
        logprobs: list[dict[int, Logprob]] = []
        finish, stop_reason = "length", None
        for step in range(sp.max_tokens):
            logits = self._next_logits(prompt + tokens, is_prompt=step == 0)
            raw = logits.clone()
            if step < sp.min_tokens:
                logits[list(stops)] = -torch.inf
            processed = logits if greedy else logits / sp.temperature
            if sp.top_p < 1.0:  # vLLM's rule: drop the low tail whose mass is at most 1 - top_p
                sorted_logits, order = processed.sort()
                drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - sp.top_p
                drop[-1] = False
                processed = processed.scatter(0, order, sorted_logits.masked_fill(drop, -torch.inf))
            if greedy:
                token = int(processed.argmax())
            else:
                token = int(torch.multinomial(processed.softmax(-1), 1, generator=generator))
            reported = {
                "raw_logprobs": raw.log_softmax(-1),
                "raw_logits": raw,
                "processed_logprobs": processed.log_softmax(-1),
                "processed_logits": processed,
            }[self.logprobs_mode]
            tokens.append(token)
            logprobs.append({token: Logprob(float(reported[token]))})
            if token in stops and step + 1 >= sp.min_tokens:
                finish, stop_reason = "stop", (token if token in (sp.stop_token_ids or ()) else None)
                break
        return CompletionOutput(
            index=index,
            text="",
            token_ids=tokens,
            cumulative_logprob=sum(lp[t].logprob for lp, t in zip(logprobs, tokens, strict=True)),
            logprobs=logprobs if sp.logprobs is not None else None,
            finish_reason=finish,
            stop_reason=stop_reason,
        )


def install(monkeypatch) -> types.ModuleType:
    """Make `import vllm` / `from vllm.inputs import TokensPrompt` find this fake until the test ends."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec("vllm") sees it installed
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt, vllm.inputs = LLM, SamplingParams, TokensPrompt, inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    # VllmBackend.create sets this for the real engine; register it so the test leaves the environment as it was
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    return vllm
