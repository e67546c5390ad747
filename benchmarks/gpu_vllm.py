"""graft's sampler vs a colocated vLLM engine on one CUDA GPU: rollout time for the same batch, and how far
each sampler's log-probs are from the trainer's (the mismatch truncated importance sampling corrects).

Needs a CUDA GPU, pip install -e '.[vllm]', and a local model folder (no download), e.g.
    python benchmarks/gpu_vllm.py --model /models/Qwen2.5-0.5B-Instruct --out gpu_vllm.json

It also checks the weight sync end to end: after one real AdamW step on the policy, vLLM sampled before the
sync must disagree with the trainer (stale weights) and agree again after sync_weights. The JSON is written
even when a phase fails (with "error"), so a short device slot still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from graft import algo
from graft.batch import Rollout
from graft.config import Config, GenerationConfig, LoraConfig, ModelConfig
from graft.models import add_lora, load_model, stop_token_ids
from graft.rollout.backends import GraftBackend, backend_problem, make_backend
from graft.rollout.sampler import position_ids_from_mask

QUESTIONS = [
    f"What is {a} + {b}? Think step by step, then give the answer."
    for a, b in zip(range(11, 95, 7), range(5, 41, 3), strict=True)
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model folder (Qwen2.5-0.5B-Instruct)")
    p.add_argument("--out", default="gpu_vllm.json", help="where the JSON results go")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts per backend (after one warm-up)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lr", type=float, default=1e-2, help="the AdamW step of the weight-sync check")
    p.add_argument("--tis-cap", type=float, default=2.0)
    return p.parse_args(argv)


def encode(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for question in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def trainer_logprobs(model, rollout: Rollout, temperature: float, rows: int = 8) -> torch.Tensor:  # (B, T)
    """The trainer's log softmax(logits / T) of the sampled tokens, a few rows at a time (with gradient when
    grad is enabled)."""
    out = []
    for start in range(0, rollout.completion_ids.shape[0], rows):
        sl = slice(start, start + rows)
        ids = torch.cat([rollout.prompt_ids[sl], rollout.completion_ids[sl]], dim=1)
        mask = torch.cat([rollout.prompt_mask[sl], torch.ones_like(rollout.completion_mask[sl])], dim=1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        P = rollout.prompt_ids.shape[1]
        lp = algo.token_logprobs(logits[:, P - 1 : -1], rollout.completion_ids[sl], temperature)
        out.append(lp * rollout.completion_mask[sl])
    return torch.cat(out)


def mismatch(model, rollout: Rollout, temperature: float, cap: float) -> dict[str, float]:
    with torch.no_grad():
        trainer = trainer_logprobs(model, rollout, temperature)
    metrics = algo.mismatch_metrics(trainer, rollout.logprobs, rollout.completion_mask, cap=cap).as_dict("")
    metrics["tokens"] = int(rollout.completion_mask.sum())
    return metrics


def timed_rollouts(backend, policy, prompts, options: dict, repeats: int) -> tuple[dict, Rollout]:
    backend.sample(policy, prompts, generator=torch.Generator("cuda").manual_seed(0), **options)  # warm-up
    seconds, tokens, rollout = [], [], None
    for i in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        rollout = backend.sample(
            policy, prompts, generator=torch.Generator("cuda").manual_seed(i + 1), **options
        )
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        tokens.append(int(rollout.completion_mask.sum()))
    result = {"step_s": seconds, "tokens": tokens, "tokens_per_s": sum(tokens) / sum(seconds)}
    result["truncated_share"] = float(rollout.truncated.float().mean())
    return result, rollout


def optimizer_step(policy, rollout: Rollout, temperature: float, lr: float) -> None:
    """One real AdamW step of a policy-gradient loss with random advantages: the weights move as training
    moves them (LoRA B leaves zero, or every weight changes)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    advantages = torch.randn(rollout.completion_ids.shape[0], 1, device=rollout.completion_ids.device)
    logprobs = trainer_logprobs(policy, rollout, temperature)
    loss = -(advantages * logprobs).sum() / rollout.completion_mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(args: argparse.Namespace, results: dict) -> None:
    cfg = Config(
        model=ModelConfig(name=args.model, device="cuda", dtype="bfloat16"),
        lora=LoraConfig(enabled=not args.full),
        generation=GenerationConfig(
            backend="vllm",
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            gpu_memory_utilization=args.gpu_memory_utilization,
        ),
    )
    device = torch.device("cuda")
    if problem := backend_problem(cfg, device):
        raise SystemExit(problem)
    results["config"] = vars(args)
    policy, tokenizer = load_model(cfg.model, device)
    if cfg.lora.enabled:
        policy = add_lora(policy, cfg.lora, seed=cfg.train.seed)
    policy.eval()
    prompts = encode(tokenizer, args.prompts)
    options = dict(
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(policy, tokenizer),
        temperature=args.temperature,
    )

    start = time.perf_counter()
    engine = make_backend(cfg, device, policy)  # before any optimizer state, as the loop does
    results["vllm"] = {"engine_start_s": time.perf_counter() - start}
    start = time.perf_counter()
    engine.sync_weights(policy)
    results["vllm"]["first_sync_s"] = time.perf_counter() - start
    results["vllm"]["first_sync_tensors"] = len(engine.loaded_names[-1])

    results["graft"], graft_rollout = timed_rollouts(GraftBackend(), policy, prompts, options, args.repeats)
    results["graft"]["mismatch"] = mismatch(policy, graft_rollout, args.temperature, args.tis_cap)
    timing, vllm_rollout = timed_rollouts(engine, policy, prompts, options, args.repeats)
    results["vllm"].update(timing)
    results["vllm"]["mismatch"] = mismatch(policy, vllm_rollout, args.temperature, args.tis_cap)
    results["speedup"] = sum(results["graft"]["step_s"]) / sum(results["vllm"]["step_s"])

    optimizer_step(policy, vllm_rollout, args.temperature, args.lr)
    generator = torch.Generator("cuda").manual_seed(99)
    stale = engine.sample(policy, prompts, generator=generator, **options)
    results["vllm"]["mismatch_stale_weights"] = mismatch(policy, stale, args.temperature, args.tis_cap)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.sync_weights(policy)
    torch.cuda.synchronize()
    results["vllm"]["sync_s"] = time.perf_counter() - start
    results["vllm"]["sync_tensors"] = len(engine.loaded_names[-1])
    synced = engine.sample(policy, prompts, generator=generator, **options)
    results["vllm"]["mismatch_after_sync"] = mismatch(policy, synced, args.temperature, args.tis_cap)
    stale_kl = results["vllm"]["mismatch_stale_weights"]["kl"]
    results["sync_verified"] = results["vllm"]["mismatch_after_sync"]["kl"] < 0.5 * stale_kl


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_vllm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import importlib.metadata

        results["vllm_version"] = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        results["vllm_version"] = None
    status = 0
    try:
        run(args, results)
    except Exception as exc:  # keep what was measured before the failure
        results["error"] = f"{type(exc).__name__}: {exc}"
        results["traceback"] = traceback.format_exc()
        status = 1
    finally:
        results["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in results.items() if k != "traceback"}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
