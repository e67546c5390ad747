"""Supervised warm-up: teach the output format on worked examples before GRPO, so the rewards are not all
zero from the start. Loss on completion tokens only; the prompt goes through the same chat template and
system prompt as in GRPO, and each completion ends with the stop token the sampler stops on."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from graft.config import Config, ConfigError
from graft.evaluation import encode_messages
from graft.models import add_lora, load_model, stop_token_ids
from graft.tasks import Problem, Task
from graft.tracking import MetricsWriter, ProgressDisplay
from graft.training.checkpoint import save_model
from graft.training.run import setup_process

Example = tuple[list[dict[str, str]], str]  # (prompt messages, wanted completion)


def read_sft_jsonl(path: Path, task: Task) -> list[Example]:
    """{"prompt", "completion"} lines (the task's system prompt is added, as in training) or {"messages"}
    lines whose last message is the assistant's reply. Errors name the file and line."""
    if not path.is_file():
        raise ConfigError(f"sft.data: '{path}' does not exist; give a JSONL file or sft.data=task")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object"
            ) from exc
        if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            *prompt, last = row["messages"]
            if not isinstance(last, dict) or last.get("role") != "assistant" or not prompt:
                raise ConfigError(f"{where}: 'messages' must end with an assistant message after the prompt")
            examples.append((prompt, str(last.get("content", ""))))
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str)
        ):
            examples.append((task.messages(Problem(row["prompt"], "")), row["completion"]))
        else:
            raise ConfigError(
                f'{where}: expected {{"prompt": str, "completion": str}} or {{"messages": [...]}}, got {line[:80]!r}'
            )
    if not examples:
        raise ConfigError(f"sft.data: '{path}' holds no examples")
    return examples


def sft_examples(cfg: Config, task: Task) -> list[Example]:
    if cfg.sft.data == "task" and task.episode_demonstrations is not None:  # every turn of solved episodes
        return task.episode_demonstrations()
    if cfg.sft.data == "task":
        return [(task.messages(p), task.demonstration(p)) for p in task.train]
    return read_sft_jsonl(Path(cfg.sft.data).expanduser(), task)


def encode_example(
    tokenizer, example: Example, stop_id: int, max_length: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, the [start, end) spans trained on): the prompt exactly as the sampler sees it, then the
    completion and the stop token, so SFT teaches the same token sequence GRPO later samples and scores.
    A multi-turn prompt's earlier assistant replies are trained on too (each where the chat template puts
    it: the conversation up to it, rendered, is a prefix of the whole), so one example teaches every turn
    of an episode instead of one example per turn re-reading the conversation."""
    messages, completion = example
    prompt = encode_messages(tokenizer, messages)
    ids = prompt + tokenizer.encode(completion, add_special_tokens=False) + [stop_id]
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i == 0:
            continue
        start = len(encode_messages(tokenizer, messages[:i]))
        reply = tokenizer.encode(str(message.get("content", "")), add_special_tokens=False) + [stop_id]
        # a template that rewrites history puts the reply elsewhere: then only the final reply is trained
        if ids[start : start + len(reply)] == reply:
            spans.append((start, start + len(reply)))
    spans.append((len(prompt), len(ids)))
    ids = ids[:max_length]
    return ids, [(a, min(b, len(ids))) for a, b in spans if a < len(ids)]


def collate(encoded: list[tuple[list[int], list[tuple[int, int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, L) input ids, attention mask and labels (-100 outside the trained spans)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, spans) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        for start, end in spans:
            labels[row, start:end] = torch.tensor(ids[start:end])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def run_sft(cfg: Config, task: Task, out_dir: Path, console=None) -> Path:
    """Train on the configured examples; writes out_dir/{config.yaml, metrics.jsonl, final/} and returns
    the final folder (a LoRA adapter, or a full model with lora.enabled=false)."""
    examples = sft_examples(cfg, task)  # data problems surface before the model loads
    s = cfg.sft
    setup_process(cfg.train)
    model, tokenizer = load_model(cfg.model)
    device = next(model.parameters()).device
    stop_id = stop_token_ids(model, tokenizer)[0]
    encoded = [encode_example(tokenizer, e, stop_id, s.max_length) for e in examples]
    if all(not spans for _, spans in encoded):
        raise ConfigError(f"sft.max_length={s.max_length} cuts every example inside its prompt; raise it")
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, cfg.train.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=cfg.train.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (s.warmup_steps + 1)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    writer = MetricsWriter(out_dir / "metrics.jsonl", keep_until_step=-1)
    display = ProgressDisplay(s.max_steps, cfg.logging.progress, console, label="SFT")
    display.print(f"SFT warm-up: {len(examples)} examples, {s.max_steps} steps of {s.batch_size}")
    rng = random.Random(cfg.train.seed)
    order: list[int] = []
    model.train()
    display.start()
    try:
        for step in range(1, s.max_steps + 1):
            t0 = time.perf_counter()
            while len(order) < s.batch_size:  # epochs in a seeded shuffled order
                order += rng.sample(range(len(encoded)), len(encoded))
            batch = collate([encoded[i] for i in order[: s.batch_size]], tokenizer.pad_token_id)
            del order[: s.batch_size]
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            if not torch.isfinite(loss):
                raise ConfigError(f"SFT step {step}: the loss is {loss.item()}; lower sft.learning_rate")
            loss.backward()
            if cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            warmup.step()
            optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step,
                "loss": loss.item(),
                "lr": warmup.get_last_lr()[0],
                "tokens": int((batch["labels"] != -100).sum()),
                "time/step": time.perf_counter() - t0,
            }
            writer.write(record)
            display.update(step, {"sft/loss": record["loss"]})
    finally:
        display.close()
        writer.close()
    model.eval()
    return save_model(model, tokenizer, out_dir / "final")


def warm_start(cfg: Config, task: Task, sft_dir: Path, console) -> Config:
    """Run the SFT warm-up unless its result is already there (a resumed run), and return the config GRPO
    runs with: the same, starting from the warm-up's adapter (or full model)."""
    final = sft_dir / "final"
    if not ((final / "adapter_config.json").is_file() or (final / "config.json").is_file()):
        run_sft(cfg, task, sft_dir, console)
    cfg = cfg.model_copy(deep=True)
    cfg.sft.enabled = False  # done: the saved config reads "GRPO from this warm-up"
    if cfg.lora.enabled:
        cfg.model.adapter = str(final)
    else:
        cfg.model.name = str(final)
    return cfg
