"""The GRPO loop, read top to bottom: rollout -> rewards -> advantages -> policy update -> metrics.

One GRPO step samples `prompts_per_step` prompts, G completions each (the groups), scores them, turns the
scores into group-relative advantages and takes `num_iterations x num_minibatches` optimizer steps on that
batch. The math is in graft.algo; this file only moves tensors between the model and those functions.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from graft import algo
from graft.config import Config
from graft.evaluation import decode_completions, encode_prompts, evaluate
from graft.health import HealthMonitor
from graft.models import (
    SamplingCopy,
    add_lora,
    load_model,
    merged_adapter,
    plain_linear_head,
    resolve_dtype,
    split_lm_head,
    stop_token_ids,
)
from graft.report import write_report
from graft.rewards.runtime import RewardRuntime, reward_name
from graft.rollout.decoder import Recording
from graft.rollout.sampler import Rollout, position_ids_from_mask, sample
from graft.tasks import Problem, Task
from graft.tracking import ProgressDisplay, Tracker
from graft.train import gate
from graft.train.checkpoint import (
    load_trainer_state,
    remove_torn_saves,
    restore_checkpoint,
    save_checkpoint,
    save_model,
)
from graft.train.records import completion_rows, step_metrics
from graft.train.replay import replay_backward, replay_problem
from graft.train.run import PromptOrder, RunDir, StopRequest, build_optimizer, setup_process
from graft.train.sft import warm_start
from graft.validate import validate_or_raise


@dataclass
class ScoredBatch:
    """A rollout plus everything the update needs; (B, ...) with a group's completions adjacent."""

    rollout: Rollout
    rewards: torch.Tensor  # (B,) weighted sum of reward functions
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T) policy before this step's updates; None when mu = 1
    ref_logprobs: torch.Tensor | None  # (B, T) reference policy; None when beta = 0
    recording: Recording | None = None  # the rollout's forward, when the update replays it (train.replay)


# --------------------------------------------------------------------------------------------- rollout


def rollout(
    policy, tokenizer, task: Task, problems: list[Problem], cfg: Config, stop_ids, generator,
    sampling_copy: SamplingCopy | None = None, recording: Recording | None = None,
) -> Rollout:  # fmt: skip
    """Sample the groups; with `recording` (graft's decoder only) the forward's tensors are kept in it."""
    policy.eval()  # no dropout while sampling: the sampler's log-probs must describe the policy we train
    if sampling_copy is not None:  # packed (generation.pack_weights) or bf16 (generation.dtype) copy
        weights = sampling_copy.sampling(policy, recording)
    else:
        weights = merged_adapter(policy, cfg.generation.merge_adapter)
    with weights as model:
        return sample(
            model,
            encode_prompts(tokenizer, task, problems),
            group_size=cfg.grpo.num_generations,
            max_new_tokens=cfg.generation.max_new_tokens,
            min_new_tokens=cfg.generation.min_new_tokens,
            pad_id=tokenizer.pad_token_id,
            stop_ids=stop_ids,
            temperature=cfg.generation.temperature,
            top_p=cfg.generation.top_p,
            generator=generator,
        )


# --------------------------------------------------------------------------------------------- rewards


def reward_inputs(tokenizer, task: Task, problems: list[Problem], r: Rollout, cfg: Config):
    """(completion texts, prompts as chat messages, columns) for the reward functions, one per completion:
    the dataset columns plus the completion token ids and the length limit (TRL passes both; length
    rewards use them)."""
    token_lists = r.completion_token_lists()
    texts = decode_completions(tokenizer, token_lists)
    prompts, columns = task.reward_inputs([p for p in problems for _ in range(r.group_size)])
    columns["completion_ids"] = token_lists
    columns["max_completion_length"] = [cfg.generation.max_new_tokens] * len(texts)
    return texts, prompts, columns


def score_completions(
    runtime: RewardRuntime,
    weights: list[float],
    prompts: list,
    completions: list[str],
    columns: dict[str, list],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total (B,), per-function (B,) each), NaN where no reward applies. Rewards see the chat messages,
    the completion and every dataset column (`answer` and the rest), one entry per completion. The total
    is the weighted sum over the functions that gave a value, NaN only when none did."""
    scores = runtime.score(prompts, completions, columns)
    per_fn = {reward_name(spec): torch.tensor(values, dtype=torch.float32) for spec, values in scores.items()}
    weighted = torch.stack([w * v for w, v in zip(weights, per_fn.values(), strict=True)])  # (F, B)
    total = torch.where(torch.isnan(weighted).all(0), torch.nan, torch.nansum(weighted, 0))
    return total, per_fn


# --------------------------------------------------------------------------------------------- log-probs


def prompt_runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row (U,), row count (U,)) of each run of identical adjacent prompts: a group's rows share one."""
    B = prompt_ids.shape[0]
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same]).nonzero().squeeze(1)
    counts = torch.diff(torch.cat([starts, torch.tensor([B], device=starts.device)]))
    return starts, counts


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,  # (B, P)
    prompt_mask: torch.Tensor,  # (B, P)
    completion_ids: torch.Tensor,  # (B, T)
    completion_mask: torch.Tensor,  # (B, T)
    temperature: float,
    share_prompts: bool = True,
    fuse_head: bool = True,
) -> torch.Tensor:  # (B, T)
    """Log-probs of the completion tokens under `model`, differentiable.

    Only the hidden states that predict a completion token go through the LM head, fused with the
    log-softmax (fuse_head) so no (B, T, V) logits exist. With share_prompts, each run of identical prompts
    (a group) is encoded once and its KV cache repeated for the group's completions; gradients still reach
    the prompt's keys and values through the repeat. Positions skip left padding as in the sampler, so the
    log-probs match the sampler's.
    """
    body, head = split_lm_head(model)
    P = prompt_ids.shape[1]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = position_ids_from_mask(attention_mask)
    starts, counts = prompt_runs(prompt_ids, prompt_mask) if share_prompts else (None, None)
    if starts is None or len(starts) == prompt_ids.shape[0]:
        hidden = body(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state[:, P - 1 : -1]  # (B, T, d): position P - 1 + t predicts completion token t
    else:
        prefill = body(
            input_ids=prompt_ids[starts],
            attention_mask=prompt_mask[starts],
            position_ids=positions[starts, :P],
            use_cache=True,
        )
        cache = prefill.past_key_values
        cache.batch_repeat_interleave(counts)  # (U, ...) -> (B, ...), differentiable
        rest = body(
            input_ids=completion_ids,
            attention_mask=attention_mask,
            position_ids=positions[:, P:],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        first = prefill.last_hidden_state[:, -1:].repeat_interleave(counts, dim=0)  # predicts token 0
        hidden = torch.cat([first, rest[:, :-1]], dim=1)  # (B, T, d)
    if fuse_head and plain_linear_head(head, model.config):
        return algo.linear_token_logprobs(hidden, head.weight, completion_ids, temperature, chunk_rows=1024)
    return algo.token_logprobs(head(hidden), completion_ids, temperature)


def micro_batch(r: Rollout, idx: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """Rows `idx` of the rollout, with the padding columns no row of them uses trimmed away."""
    prompt_mask = r.prompt_mask[idx]
    completion_mask = r.completion_mask[idx]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # leftmost column some prompt uses
    last = int(completion_mask.sum(1).max())  # longest completion
    return tuple(
        t.to(device)
        for t in (
            r.prompt_ids[idx, first:],
            prompt_mask[:, first:],
            r.completion_ids[idx, :last],
            completion_mask[:, :last],
        )
    )


def autocast(cfg: Config, device: torch.device):
    """The training forward's mixed-precision context (train.autocast); the backward runs outside it."""
    if cfg.train.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.train.autocast))


@torch.no_grad()
def frozen_logprobs(model, r: Rollout, cfg: Config, device) -> torch.Tensor:
    """(B, T) log-probs of the whole rollout under `model` without gradients, micro-batch by micro-batch."""
    out = torch.zeros_like(r.logprobs)
    for idx in torch.arange(r.completion_ids.shape[0]).split(cfg.train.micro_batch_size):
        prompt_ids, prompt_mask, completion_ids, completion_mask = micro_batch(r, idx, device)
        with autocast(cfg, device):
            lp = completion_logprobs(
                model, prompt_ids, prompt_mask, completion_ids, completion_mask, cfg.generation.temperature
            )
        out[idx, : lp.shape[1]] = lp.float().cpu() * completion_mask.cpu()
    return out


# --------------------------------------------------------------------------------------------- update


def update_policy(policy, optimizer, scheduler, batch: ScoredBatch, cfg: Config, device, params) -> dict:
    """num_iterations passes over the batch, each split into num_minibatches optimizer steps, each made of
    micro-batches whose gradients accumulate (loss normalisers count the whole minibatch, see algo). With a
    recording (mu = 1, one minibatch) the single step replays the rollout's forward instead."""
    g = cfg.grpo
    r = batch.rollout
    B = r.completion_ids.shape[0]
    minibatch_size = B // g.num_minibatches
    losses, clip_fracs, kls, grad_norms = [], [], [], []
    skipped = 0

    def loss(
        logprobs: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, mb: torch.Tensor, num_tokens: int
    ):
        T = logprobs.shape[1]
        old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[idx, :T].to(device)
        ref = None if batch.ref_logprobs is None else batch.ref_logprobs[idx, :T].to(device)
        return algo.policy_loss(
            logprobs,
            old,
            batch.advantages[idx].to(device),
            mask,
            loss_type=g.loss_type,
            num_sequences=len(mb),
            num_tokens=num_tokens,
            max_completion_length=cfg.generation.max_new_tokens,
            epsilon=g.epsilon,
            epsilon_high=g.epsilon_high,
            delta=g.delta,
            importance_sampling_level=g.importance_sampling_level,
            beta=g.beta,
            ref_logprobs=ref,
        )

    policy.train()
    for _ in range(g.num_iterations):
        for mb in torch.arange(B).split(minibatch_size):
            num_tokens = int(r.completion_mask[mb].sum())
            optimizer.zero_grad(set_to_none=True)
            outs = []
            if batch.recording is not None:
                mask = r.completion_mask.to(device)
                loss_fn = functools.partial(loss, idx=mb, mask=mask, mb=mb, num_tokens=num_tokens)
                outs.append(replay_backward(policy, batch.recording, r, cfg.generation.temperature, loss_fn))
            else:
                for idx in mb.split(cfg.train.micro_batch_size):
                    prompt_ids, prompt_mask, completion_ids, mask = micro_batch(r, idx, device)
                    with autocast(cfg, device):
                        logprobs = completion_logprobs(
                            policy, prompt_ids, prompt_mask, completion_ids, mask, cfg.generation.temperature
                        )
                    outs.append(loss(logprobs, idx, mask, mb, num_tokens))
                    outs[-1].loss.backward()
            # statistics stay on the device until the end: .item() per micro-batch would stall a GPU
            step_loss = torch.stack([out.loss.detach() for out in outs]).sum()
            clip_fracs.extend(out.clip_fraction for out in outs)
            kls.extend(out.kl for out in outs if out.kl is not None)
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if torch.isfinite(step_loss) and torch.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                grad_norms.append(grad_norm)
                losses.append(step_loss)
            else:  # one bad batch must not poison the weights or Adam's moments: skip it, count it
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
    policy.eval()

    def mean(xs: list) -> float | None:
        return torch.stack([torch.as_tensor(x) for x in xs]).float().mean().item() if xs else None

    return {
        "loss": mean(losses),
        "grad_norm": mean(grad_norms),
        "clip_fraction": mean(clip_fracs),
        "kl": mean(kls),
        "lr": scheduler.get_last_lr()[0],
        "nonfinite_skipped": skipped,
        "replayed": batch.recording is not None,  # train.replay: backward through the rollout's forward
        "optimizer_steps": g.num_iterations * g.num_minibatches,
    }


# --------------------------------------------------------------------------------------------- loop


class TrainingInterrupted(Exception):
    """The run stopped early on request (signal or stop_after) after saving a checkpoint at `step`."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped after step {step}; checkpoint saved in {run_dir / 'checkpoints'}")
        self.step, self.run_dir = step, run_dir


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. updates that stay non-finite); the message says what to change."""


def train(cfg: Config, console=None, stop_after: int | None = None) -> Path:
    """Run GRPO as configured; returns the run directory. stop_after=k stops after step k exactly as a
    Ctrl-C would (checkpoint, then TrainingInterrupted), for notebooks and tests."""
    checked = validate_or_raise(cfg)  # every config, data, path, disk and memory problem, before any loading
    memory = checked.memory
    run, resume_from = RunDir.for_config(cfg)
    display = ProgressDisplay(cfg.train.max_steps, cfg.logging.progress, console)
    if memory is not None:
        display.print(f"memory estimate: {memory.describe()}")
    for line in checked.paths.report_lines() if checked.paths else []:
        display.print(escape(line))
    state = load_trainer_state(resume_from) if resume_from else None
    if state is not None:
        saved_seed = state["trainer_state"]["config"]["train"]["seed"]
        if saved_seed != cfg.train.seed:
            display.print(f"[yellow]resuming with seed {saved_seed} from the checkpoint[/yellow] "
                          f"(the config says {cfg.train.seed}; a run keeps the seed it started with)")  # fmt: skip
            cfg = cfg.model_copy(deep=True)  # the caller's config object stays as given
            cfg.train.seed = saved_seed
    if cfg.sft.enabled:  # the chained recipe: SFT warm-up in <run>/sft, then GRPO starts from its result
        cfg = warm_start(cfg, checked.task, run.path / "sft", display.console)
    if cfg.logging.print_config:
        display.print(f"[bold]graft[/bold] run directory: {run.path}\n[dim]{escape(cfg.to_yaml())}[/dim]")
    deterministic_before = torch.are_deterministic_algorithms_enabled()  # process-wide: put back at the end
    setup_process(cfg.train)

    # The task and the reward functions were built by the checks above; nothing is read or imported twice.
    task = checked.task
    rc = cfg.rewards
    functions = rc.functions or list(task.default_rewards)
    runtime = RewardRuntime(functions, rc.timeout, rc.num_workers, rc.on_error, rc.max_failure_rate,
                            completion_format=rc.completion_format, functions=checked.rewards)  # fmt: skip
    weights = rc.weights or [1.0] * len(functions)
    correctness_name = task.default_rewards[0]
    # accuracy goes through a runtime too: math-verify may hang, so it never runs unguarded in this process
    judge = runtime if correctness_name in functions else RewardRuntime([correctness_name], rc.timeout, 1)

    correctness = judge.scorer(correctness_name)

    policy, tokenizer = load_model(cfg.model)
    device = next(policy.parameters()).device
    stop_ids = stop_token_ids(policy, tokenizer)
    ref_model = None
    if cfg.grpo.beta > 0 and not cfg.lora.enabled:  # full fine-tuning needs a frozen copy; LoRA does not
        ref_model = copy.deepcopy(policy).requires_grad_(False)
    if cfg.lora.enabled:
        policy = add_lora(policy, cfg.lora, cfg.train.seed)
    run.create(cfg)
    sampling_copy = None
    sampling_dtype = (
        policy.dtype if cfg.generation.dtype == "auto" else resolve_dtype(cfg.generation.dtype, device)
    )
    pack = cfg.generation.pack_weights and device.type == "cpu"
    if pack or sampling_dtype != policy.dtype:
        sampling_copy = SamplingCopy(policy, sampling_dtype, pack=pack)
    replay_reason = replay_problem(policy, sampling_copy, cfg) if cfg.train.replay else None
    replaying = cfg.train.replay and replay_reason is None
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    order = PromptOrder(task, cfg.train.seed)
    first_step, nonfinite_streak, eval_history = 1, 0, {}
    if state is not None:
        restore_checkpoint(resume_from, state, policy, optimizer, scheduler, order, generator)
        first_step = state["step"] + 1
        nonfinite_streak = state["trainer_state"].get("nonfinite_streak", 0)
        eval_history = {k: v for k, v in run.read_json("eval.json").items() if v["step"] <= state["step"]}
        display.print(f"resuming {run.path.name} from {resume_from.name} (step {state['step']})")
    remove_torn_saves(run.path / "checkpoints")
    # on resume, records after the checkpoint are redone; a fresh start in an old folder drops them all
    tracker = Tracker(run.path, cfg, keep_until_step=first_step - 1 if state else -1)
    health = HealthMonitor(cfg.health)
    if state is not None and "health" in state["trainer_state"]:
        health.restore(state["trainer_state"]["health"])

    def run_eval(tag: str, step: int) -> float:
        e = cfg.eval
        # its own generator: pass@k sampling must not move the training sampler's random sequence
        eval_generator = torch.Generator(device=device).manual_seed(cfg.train.seed + step)
        with merged_adapter(policy, cfg.generation.merge_adapter):
            result = evaluate(
                policy, tokenizer, task, correctness,
                max_new_tokens=e.max_new_tokens or cfg.generation.max_new_tokens, stop_ids=stop_ids,
                num_problems=e.num_prompts, batch_size=e.batch_size, num_samples_kept=e.num_samples_kept,
                num_samples=e.num_samples, temperature=e.temperature, generator=eval_generator,
            )  # fmt: skip
        eval_history[tag] = {"step": step, **result.to_dict()}
        run.write_json("eval.json", eval_history)
        return result.accuracy

    def checkpoint(step: int) -> None:
        trainer_state = {
            "order": order.state(),
            "nonfinite_streak": nonfinite_streak,
            "health": health.state(),
            "config": cfg.model_dump(mode="json"),
        }
        save_checkpoint(
            run.path / "checkpoints", step, model=policy, tokenizer=tokenizer, optimizer=optimizer,
            scheduler=scheduler, trainer_state=trainer_state, generator=generator,
            keep_last_n=cfg.checkpoint.keep_last_n,
        )  # fmt: skip

    try:
        if cfg.gate.enabled and state is None:
            run_gate(policy, tokenizer, task, cfg, runtime, judge, correctness_name, stop_ids, sampling_copy, run,
                     display)  # fmt: skip
        if cfg.eval.at_start and state is None:
            display.print("evaluating the starting model on the held-out split ...")
            accuracy = run_eval("before", 0)
            display.print(f"held-out accuracy before training: {accuracy:.3f}")
            tracker.write({"step": 0, "eval/accuracy": accuracy})
        if replay_reason is not None:
            display.print(
                f"[dim]train.replay: not used, a second forward per update: {escape(replay_reason)}[/dim]"
            )
        display.start(first_step - 1)

        with StopRequest() as stop:
            for step in range(first_step, cfg.train.max_steps + 1):
                t0 = time.perf_counter()
                problems = order.next_problems(cfg.train.prompts_per_step)
                recording = Recording() if replaying else None
                r = rollout(
                    policy, tokenizer, task, problems, cfg, stop_ids, generator, sampling_copy, recording
                )
                if r.completion_ids.shape[1] < 2:  # nothing was fed back to the model: no forward to replay
                    recording = None
                t1 = time.perf_counter()

                texts, prompts, columns = reward_inputs(tokenizer, task, problems, r, cfg)
                rewards, per_fn = score_completions(runtime, weights, prompts, texts, columns)
                if correctness_name not in per_fn:  # accuracy is logged even when training on other rewards
                    per_fn[correctness_name] = torch.tensor(correctness(prompts, texts, **columns))
                t2 = time.perf_counter()

                advantages, zero_variance = algo.group_advantages(
                    rewards, r.group_size, cfg.grpo.scale_rewards
                )
                reuse = (
                    cfg.grpo.num_iterations > 1 or cfg.grpo.num_minibatches > 1
                )  # batch outlives an update
                old = frozen_logprobs(policy, r, cfg, device) if reuse else None
                ref = None
                if cfg.grpo.beta > 0:
                    with policy.disable_adapter() if ref_model is None else contextlib.nullcontext():
                        ref = frozen_logprobs(ref_model or policy, r, cfg, device)
                batch = ScoredBatch(r, rewards, advantages, old, ref, recording)
                del recording  # the update consumes it; its tensors go as soon as each layer is done
                update = update_policy(policy, optimizer, scheduler, batch, cfg, device, params)
                t3 = time.perf_counter()

                metrics = {
                    "step": step,
                    **step_metrics(batch, per_fn, zero_variance),
                    **runtime.metrics(),
                    **update,
                }
                metrics["accuracy"] = (per_fn[correctness_name] >= 1.0).float().mean().item()
                metrics.update(
                    {
                        "tokens_per_s": int(r.completion_mask.sum()) / (t3 - t0),
                        "time/step": t3 - t0,
                        "time/rollout": t1 - t0,
                        "time/reward": t2 - t1,
                        "time/train": t3 - t2,
                    }
                )
                for alarm in health.check(metrics):
                    display.print(f"[bold yellow]health:[/bold yellow] {escape(alarm.message())}")
                rows = completion_rows(step, problems, texts, batch, per_fn)
                tracker.write_completions(rows)
                if cfg.logging.completions_every and step % cfg.logging.completions_every == 0:
                    display.completions_table(step, rows)
                all_skipped = update["nonfinite_skipped"] == update["optimizer_steps"]
                nonfinite_streak = nonfinite_streak + 1 if all_skipped else 0
                if nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    tracker.write(metrics)
                    raise TrainingError(
                        f"step {step}: the loss or gradient was not finite in every update of the last "
                        f"{nonfinite_streak} steps, so the weights were left as they were and the run stops. "
                        f"Batch prompts: {[p.prompt for p in problems]}. Try a lower train.learning_rate, "
                        "rewards on a sane scale (or grpo.scale_rewards=group), or train.max_grad_norm."
                    )
                final_eval_follows = cfg.eval.at_end and step == cfg.train.max_steps
                if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and not final_eval_follows:
                    metrics["eval/accuracy"] = run_eval(f"step_{step}", step)
                stopping = stop.requested or step == stop_after
                every = cfg.checkpoint.every_n_steps
                if step == cfg.train.max_steps or stopping or (every and step % every == 0):
                    checkpoint(step)
                tracker.write(metrics)
                display.update(step, metrics)
                if stopping and step < cfg.train.max_steps:
                    raise TrainingInterrupted(step, run.path)

        display.close()
        save_model(policy, tokenizer, run.path / "final")
        if cfg.eval.at_end:
            accuracy = run_eval("after", cfg.train.max_steps)
            tracker.write({"step": cfg.train.max_steps, "eval/accuracy": accuracy})
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the error that stopped the run matters more
            display.print(f"report so far: {write_report(run.path)}")
        raise
    finally:
        display.close()
        tracker.close()
        runtime.close()
        judge.close()
        torch.use_deterministic_algorithms(deterministic_before)
    report = write_report(run.path)
    run.print_summary(display, eval_history, report)
    return run.path


def run_gate(policy, tokenizer, task, cfg, runtime, judge, correctness_name, stop_ids, sampling_copy, run,
             display) -> None:  # fmt: skip
    """Probe before the first step, sampling exactly as the steps will; writes gate.json and raises GateError
    when a gated reward is zero on every completion."""

    def score(prompts, completions, columns) -> dict[str, list]:
        scores = {reward_name(k): v for k, v in runtime.score(prompts, completions, columns).items()}
        if correctness_name not in scores:
            scores[correctness_name] = judge.scorer(correctness_name)(prompts, completions, **columns)
        return scores

    functions = [reward_name(f) for f in (cfg.rewards.functions or task.default_rewards)]
    gated = gate.gated_rewards(task, functions, cfg.gate.rewards)
    unknown = [g for g in gated if g not in functions and g != correctness_name]
    if unknown:
        raise gate.GateError(f"gate.rewards names {unknown}, which this run does not compute; use some of "
                             f"{sorted(set(functions) | {correctness_name})}")  # fmt: skip
    display.print(f"gate: probing {cfg.gate.num_prompts} training prompts x {cfg.grpo.num_generations} ...")
    problems = task.train[: cfg.gate.num_prompts]
    # its own generator: the run's sampling sequence is the same with the gate on or off
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.train.seed + 7919)
    r = rollout(policy, tokenizer, task, problems, cfg, stop_ids, generator, sampling_copy)
    texts, prompts, columns = reward_inputs(tokenizer, task, problems, r, cfg)
    result = gate.GateResult(score(prompts, texts, columns), gated, texts[0] if texts else "")
    run.write_json("gate.json", {"passed": not result.failing(), "rewards": result.summary()})
    gate.check(result, min(cfg.gate.num_prompts, len(task.train)), cfg.grpo.num_generations)
    parts = [
        f"{n} mean {v['mean']:.2f} ({v['nonzero']}/{v['scored']} nonzero)"
        for n, v in result.summary().items()
    ]
    display.print("gate passed: " + "; ".join(parts))
