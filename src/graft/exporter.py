"""graft export: the trained adapter, a merged full model (safetensors + tokenizer, loadable by plain
transformers and vLLM) checked against the adapter by default, a GGUF file for llama.cpp (Llama-family),
and a push to a hub repo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from graft.inference import Target, generate, load_target
from graft.models import dequantized_merge, is_quantized, resolve_dtype
from graft.tasks import system_prompt
from graft.training.checkpoint import CheckpointError, atomic_dir


class ExportError(RuntimeError):
    """An export that cannot be made or does not check out; the message says why and what to do."""


# Prompts for the parity check: varied enough that the completions exercise every layer and many tokens.
PARITY_PROMPTS = (
    "What is 12 + 7?",
    "Explain in one sentence what a prime number is.",
    "A train travels 60 km in 1.5 hours. What is its average speed?",
    "Write a short poem about a river.",
)


def default_tolerance(dtype: torch.dtype) -> float:
    """Max |log-prob difference| (nats) accepted between the merged model and the adapter: float32 merging
    only reorders sums (measured ~1e-5 on the built-in model); 16-bit weights round the merged delta."""
    return 1e-3 if dtype == torch.float32 else 0.1


def token_logprobs(model, sequences: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    """Log-prob of each token from position `start` on, one plain forward per sequence (no fast paths:
    the check must not share code with what it checks)."""
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids, start in zip(sequences, starts, strict=True):
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()  # (L-1, V): position i predicts token i + 1
            lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1)
            out.append(lp[start - 1 :].cpu())
    return out


def parity_probe(
    model, tokenizer, target: Target, max_new_tokens: int = 24
) -> tuple[list[list[int]], list[int]]:
    """(prompt + greedy completion token ids, prompt lengths) for the parity prompts, with the run's
    system prompt and chat template."""
    from graft.evaluation import encode_messages

    system = system_prompt(target.cfg.task)
    conversations = [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        for p in PARITY_PROMPTS
    ]
    replies = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
    sequences, starts = [], []
    for messages, reply in zip(conversations, replies, strict=True):
        prompt = encode_messages(tokenizer, messages)
        sequences.append(prompt + tokenizer.encode(reply, add_special_tokens=False))
        starts.append(len(prompt))
    return sequences, starts


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel())


def _write_card(folder: Path, target: Target, kind: str) -> None:
    """graft_export.json (machine-readable) and README.md: what this is and how to prompt it as trained."""
    cfg = target.cfg
    system = system_prompt(cfg.task)
    info = {
        "kind": kind,
        "run": target.label,
        "base_model": cfg.model.name,
        "warmup_adapter": cfg.model.adapter,
        "task": cfg.task.name,
        "prompt_format": cfg.task.prompt_format,
        "system_prompt": system,
    }
    (folder / "graft_export.json").write_text(json.dumps(info, indent=2))
    loading = (
        f'from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, "{folder.name}")'
        if kind == "adapter"
        else f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{folder.name}")'
    )
    (folder / "README.md").write_text(
        f"# {target.label} ({kind})\n\nTrained with graft (GRPO) on the `{cfg.task.name}` task from "
        f"`{cfg.model.name}`.\n\nPrompt it as in training, through the tokenizer's chat template with this "
        f"system prompt:\n\n```\n{system or '(none)'}\n```\n\n```python\n{loading}\n```\n"
    )


def export_adapter(target: Target, out: Path) -> Path:
    if not target.is_adapter:
        raise ExportError(
            f"{target.weights} is not a LoRA adapter (the run trained all weights); export --merged"
        )
    if target.cfg.model.adapter:
        print(
            f"graft: note: this adapter applies on top of {target.cfg.model.name} with the warm-up adapter "
            f"{target.cfg.model.adapter} merged in; --merged gives a self-contained model"
        )

    def write(tmp: Path) -> None:
        for item in target.weights.iterdir():
            if item.is_file() and item.name != "trainer_state.pt":  # a checkpoint's optimizer state stays
                shutil.copy2(item, tmp / item.name)
        _write_card(tmp, target, "adapter")

    return _atomic_write(out, write)


def export_merged(target: Target, out: Path, parity: bool = True, tolerance: float | None = None) -> dict:
    """Merge the adapter into the weights and save a plain transformers model. With parity, reload the
    saved folder with plain transformers and compare its log-probs with the unmerged adapter model."""
    model, tokenizer = load_target(target)
    dtype = next(model.parameters()).dtype
    if parity:
        sequences, starts = parity_probe(model, tokenizer, target)
        reference = token_logprobs(model, sequences, starts)  # the adapter as trained, unmerged
    if is_quantized(model):  # merge into the de-quantized weights the adapter was trained against
        dtype = resolve_dtype(target.cfg.model.dtype, next(model.parameters()).device)
        merged = dequantized_merge(model, dtype)
    else:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_card(tmp, target, "merged")

    _atomic_write(out, write)
    report: dict = {"path": str(out), "dtype": str(dtype).removeprefix("torch.")}
    if parity:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(next(model.parameters()).device)
        diff = max_difference(reference, token_logprobs(reloaded, sequences, starts))
        tol = tolerance if tolerance is not None else default_tolerance(dtype)
        report.update(
            parity_max_abs_logprob_diff=diff,
            parity_tolerance=tol,
            parity_tokens=sum(len(s) - p for s, p in zip(sequences, starts, strict=True)),
        )
        (out / "parity.json").write_text(json.dumps(report, indent=2))
        if not diff <= tol:
            shutil.rmtree(out, ignore_errors=True)
            raise ExportError(
                f"parity check failed: the merged model's log-probs differ from the adapter's by {diff:.3g} "
                f"nats (tolerance {tol:g}), so the merged folder was removed. The adapter itself is intact; "
                "export --adapter, or retry with model.dtype=float32."
            )
    return report


# Max |log-prob difference| accepted when the GGUF file is read back: weight rounding only (f16 on the
# built-in model measured 0.04 in logits; bf16 keeps 8 mantissa bits, about 8x coarser).
GGUF_TOLERANCE = {"f32": 1e-3, "f16": 0.25, "bf16": 1.0}


def export_gguf(merged_dir: Path, out_file: Path, dtype: str = "f16", tolerance: float | None = None) -> dict:
    """Write GGUF from a merged folder, then load the file back with transformers' GGUF reader and compare
    log-probs with the merged model on the parity prompts."""
    tolerance = GGUF_TOLERANCE[dtype] if tolerance is None else tolerance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graft.gguf_export import GGUFExportError, write_gguf

    try:
        write_gguf(merged_dir, out_file, dtype=dtype)
    except GGUFExportError as exc:
        raise ExportError(str(exc)) from exc
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_file.parent, gguf_file=out_file.name, dtype=torch.float32
    )
    from graft.evaluation import encode_messages

    sequences = [encode_messages(tokenizer, [{"role": "user", "content": p}]) for p in PARITY_PROMPTS]
    starts = [1] * len(sequences)
    diff = max_difference(
        token_logprobs(merged, sequences, starts), token_logprobs(reloaded, sequences, starts)
    )
    report = {
        "path": str(out_file),
        "dtype": dtype,
        "reload_max_abs_logprob_diff": diff,
        "tolerance": tolerance,
    }
    if not diff <= tolerance:
        out_file.unlink(missing_ok=True)
        raise ExportError(
            f"the GGUF file read back differs from the merged model by {diff:.3g} nats "
            f"(tolerance {tolerance}); it was removed. Try --gguf-dtype f32."
        )
    return report


def push_to_hub(folder: Path, repo: str, private: bool = False, endpoint: str | None = None) -> str:
    """Upload an exported folder to a hub model repo (created if missing). Needs a network and a token
    (`hf auth login` or HF_TOKEN); endpoint: another hub than huggingface.co (HF_ENDPOINT also works)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(endpoint=endpoint)
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="graft export")
    except Exception as exc:  # network, auth, permissions, offline mode: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"could not push {folder} to the hub repo '{repo}': {reason}. Log in (hf auth login, or set "
            "HF_TOKEN), check the network (HF_HUB_OFFLINE must be unset) and your write access to the repo. "
            "The export on disk is complete."
        ) from exc
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}"


def _atomic_write(out: Path, write) -> Path:
    try:
        return atomic_dir(out, write, advice="free disk space or export elsewhere (--to)")
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
