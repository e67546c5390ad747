"""One GRPO step, read top to bottom: rollout -> rewards -> advantages -> policy update (grpo_step).

A step samples `prompts_per_step` prompts, G completions each (the groups), scores them, turns the scores
into group-relative advantages and takes `num_iterations x num_minibatches` optimizer steps on that batch.
The math is in graft.algo; this file only moves tensors between the model and those functions. Everything
built once per run (model, optimizer, rewards) is a StepSetup, made by graft.training.loop, which also does
the bookkeeping around the steps (evaluation, checkpoints, health, logs).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from graft import algo
from graft.batch import Rollout, ScoredBatch, concat_rollouts, group_rows, select_groups
from graft.config import Config
from graft.cpu.fast_path import FastPath
from graft.evaluation import encode_prompts
from graft.kv_cache import cache_kwargs, output_cache
from graft.models import plain_linear_head, split_lm_head
from graft.rollout.sampler import position_ids_from_mask
from graft.tasks import Problem
from graft.training.distributed import SINGLE, Ranks, full_tensor, reduce_metrics
from graft.training.episodes import play_and_score
from graft.training.fsdp import as_forward, full_weights
from graft.training.order import solved_groups
from graft.training.records import PhaseTimer, step_metrics
from graft.training.scoring import score_rollout
from graft.training.setup import StepSetup


def grpo_step(setup: StepSetup, draw_problems: Callable[[int], list[Problem]]) -> tuple[ScoredBatch, dict]:
    """One GRPO step on the next `train.prompts_per_step` problems; returns the scored batch and the step's
    metrics.

    1. rollout: G completions per prompt (a group), their token ids and sampling log-probs (a multi-turn
       task: G whole episodes against its environment);
    2. rewards: every completion (episode) scored by each reward function, weighted into one total;
    3. dynamic sampling (grpo.dynamic_sampling): groups whose rewards all agree teach nothing, so more
       problems are drawn and sampled until the batch has enough groups that differ (DAPO);
    4. advantages: each total against its group's mean (scaled per grpo.scale_rewards), or W-REINFORCE's
       weights without a baseline (grpo.advantage);
    5. frozen log-probs: the old policy's when the batch outlives an update, the reference's when beta > 0;
    6. update: num_iterations x num_minibatches optimizer steps on the clipped policy loss (plus the
       entropy bonus, grpo.entropy_coef);
    7. entropy control (grpo.entropy_target): the bonus's weight for the next step, from this one's entropy.
    """
    cfg, timer, ranks, entropy = setup.cfg, PhaseTimer(), setup.ranks, setup.entropy_control
    # every rank draws the step's problems; each keeps its share (one process: all of them)
    batch = sample_and_score(setup, ranks.share(draw_problems(cfg.train.prompts_per_step)), timer)
    sampling = {}
    if cfg.grpo.dynamic_sampling:
        batch, sampling = keep_groups_with_signal(setup, batch, draw_problems, timer)
    with timer.phase("train"):  # steps 4-6
        rewards = ranks.gather_rows(batch.rewards)
        advantages, zero_variance = algo.group_advantages(
            rewards, cfg.grpo.num_generations, cfg.grpo.scale_rewards
        )
        if cfg.grpo.advantage == "w_reinforce":  # no group baseline: every group has a signal
            advantages = algo.weighted_reinforce_advantages(rewards, cfg.grpo.positive_weight)
            zero_variance = torch.zeros_like(zero_variance)
        batch.advantages, zero_variance = ranks.share_rows(advantages), ranks.share_rows(zero_variance)
        batch.old_logprobs, batch.ref_logprobs = old_and_reference_logprobs(setup, batch.rollout)
        update = update_policy(
            setup.policy,
            setup.optimizer,
            setup.scheduler,
            batch,
            cfg,
            setup.device,
            setup.params,
            setup.fast_path,
            ranks,
            entropy_coef=entropy.coef,
        )
        setup.backend.sync_weights(setup.policy)  # the next rollout samples the updated policy
    metrics = {
        **step_metrics(batch, zero_variance),
        **sampling,
        **batch.metrics,
        **setup.rewards.metrics(),
        **update,
    }
    metrics.update(timer.metrics())
    correct = batch.reward_components[setup.correctness_name]
    metrics.setdefault("accuracy", (correct >= 1.0).float().mean().item())
    metrics["tokens_per_s"] = int(batch.rollout.completion_mask.sum()) / metrics["time/step"]
    metrics = reduce_metrics(ranks, metrics)
    metrics["entropy_coef"] = entropy.coef  # the weight this step's update used
    entropy.after_step(metrics)  # step 7
    return batch, metrics


def sample_and_score(setup: StepSetup, problems: list[Problem], timer: PhaseTimer) -> ScoredBatch:
    """Steps 1 and 2 for `problems`: the rollout and its rewards (advantages follow in grpo_step); whole
    episodes against the task's environment for a multi-turn task (graft.training.episodes)."""
    if setup.environment is not None:
        batch = play_and_score(setup, problems, timer)
    else:
        with timer.phase("rollout"):
            rollout = sample_groups(setup, problems)
        with timer.phase("reward"):
            completions, rewards, components = score_rollout(setup, problems, rollout)
        no_advantages = torch.zeros_like(rewards)
        batch = ScoredBatch(rollout, rewards, no_advantages, None, None, completions, components, problems)
    solved = solved_groups(batch.reward_components[setup.correctness_name], setup.cfg.grpo.num_generations)
    batch.solved = list(zip(problems, solved.tolist(), strict=True))
    return batch


def keep_groups_with_signal(
    setup: StepSetup, first: ScoredBatch, draw_problems: Callable[[int], list[Problem]], timer: PhaseTimer
) -> tuple[ScoredBatch, dict]:
    """DAPO's dynamic sampling: keep the groups whose rewards differ (the others have advantage 0 and only
    dilute the loss); while fewer than train.prompts_per_step are kept, draw that many more problems and
    sample again, at most grpo.max_sampling_rounds rollouts in all. Returns the batch of kept groups (at
    most prompts_per_step; all of the first rollout's when none differ anywhere) and what was drawn,
    kept and dropped. A single round keeps its rollout and masks the dropped groups out of the loss, so the
    fast path can still replay it; several rounds are joined into one rollout of the kept groups."""
    cfg, G, want = setup.cfg, setup.cfg.grpo.num_generations, setup.cfg.train.prompts_per_step
    rounds = [first]
    signal = [(0, g) for g in _groups_with_signal(first, G)]
    while len(signal) < want and len(rounds) < cfg.grpo.max_sampling_rounds:
        rounds.append(sample_and_score(setup, draw_problems(want), timer))
        signal += [(len(rounds) - 1, g) for g in _groups_with_signal(rounds[-1], G)]
    drawn = sum(len(r.problems) for r in rounds)
    kept = signal[:want]
    counts = {
        "sampling/rounds": len(rounds),
        "sampling/groups_drawn": drawn,
        "sampling/groups_kept": len(kept),
    }
    counts["sampling/groups_dropped"] = drawn - len(kept)
    counts["zero_variance_group_fraction"] = 1 - len(signal) / drawn  # over every group drawn
    # sampled accuracy over every completion drawn: the kept groups alone would overstate it
    correct = torch.cat([r.reward_components[setup.correctness_name] for r in rounds])
    counts["accuracy"] = (correct >= 1.0).float().mean().item()
    solved = [group for r in rounds for group in r.solved]
    if not kept:  # no signal anywhere: the first rollout, every advantage 0 (counted, nothing learned)
        counts["sampling/groups_kept"], counts["sampling/groups_dropped"] = (
            len(first.problems),
            drawn - len(first.problems),
        )
        first.solved = solved
        return first, counts
    if len(rounds) == 1:
        keep_groups = torch.zeros(len(first.problems), dtype=torch.bool)
        keep_groups[[g for _, g in kept]] = True
        keep = keep_groups.repeat_interleave(G)
        first.loss_rows = keep if first.loss_rows is None else keep & first.loss_rows
        first.solved = solved
        return first, counts
    with timer.phase("rollout"):
        parts = [_select(rounds[i], [g for j, g in kept if j == i]) for i in range(len(rounds))]
        parts = [p for p in parts if p.problems]
        rollout = concat_rollouts([p.rollout for p in parts], setup.tokenizer.pad_token_id)
    components = {
        name: torch.cat([p.reward_components[name] for p in parts]) for name in first.reward_components
    }
    batch = ScoredBatch(
        rollout,
        torch.cat([p.rewards for p in parts]),
        torch.cat([p.advantages for p in parts]),
        None,
        None,
        [c for p in parts for c in p.completions],
        components,
        [problem for p in parts for problem in p.problems],
        # rows a part left out itself (broken episodes) stay out
        loss_rows=None
        if all(p.loss_rows is None for p in parts)
        else torch.cat(
            [
                torch.ones(len(p.rewards), dtype=torch.bool) if p.loss_rows is None else p.loss_rows
                for p in parts
            ]
        ),
        metrics=first.metrics,
        solved=solved,
    )
    return batch, counts


def _groups_with_signal(batch: ScoredBatch, group_size: int) -> list[int]:
    _, zero_variance = algo.group_advantages(batch.rewards, group_size, "none")
    return (~zero_variance).nonzero().squeeze(1).tolist()


def _select(batch: ScoredBatch, groups: list[int]) -> ScoredBatch:
    """The batch's groups `groups`, as a batch of their own (before advantages)."""
    rows = group_rows(groups, batch.rollout.group_size)
    return ScoredBatch(
        select_groups(batch.rollout, groups),
        batch.rewards[rows],
        batch.advantages[rows],
        None,
        None,
        [batch.completions[int(i)] for i in rows],
        {name: values[rows] for name, values in batch.reward_components.items()},
        [batch.problems[g] for g in groups],
        loss_rows=None if batch.loss_rows is None else batch.loss_rows[rows],
    )


# --------------------------------------------------------------------------------------------- rollout


def sample_groups(setup: StepSetup, problems: list[Problem], for_update: bool = True) -> Rollout:
    """G completions for each problem, through the fast path when the run has one (`for_update`: this
    batch will be trained on, so the fast path may record the forward for its replayed update)."""
    cfg = setup.cfg
    setup.policy.eval()  # no dropout while sampling: the sampler's log-probs must describe the policy we train
    prompts = encode_prompts(setup.tokenizer, setup.task, problems)
    options = dict(
        group_size=cfg.grpo.num_generations,
        max_new_tokens=cfg.generation.max_new_tokens,
        min_new_tokens=cfg.generation.min_new_tokens,
        pad_id=setup.tokenizer.pad_token_id,
        stop_ids=setup.stop_ids,
        temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p,
        generator=setup.generator,
    )
    if setup.fast_path is not None:
        return setup.fast_path.sample(setup.policy, prompts, for_update=for_update, **options)
    with full_weights(setup.policy):  # train.fsdp: each rank samples from the gathered shards
        return setup.backend.sample(setup.policy, prompts, **options)


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
        cache = output_cache(prefill)
        cache.batch_repeat_interleave(counts)  # (U, ...) -> (B, ...), differentiable
        rest = body(
            input_ids=completion_ids,
            attention_mask=attention_mask,
            position_ids=positions[:, P:],
            use_cache=True,
            **cache_kwargs(body, cache),
        ).last_hidden_state
        first = prefill.last_hidden_state[:, -1:].repeat_interleave(counts, dim=0)  # predicts token 0
        hidden = torch.cat([first, rest[:, :-1]], dim=1)  # (B, T, d)
    if fuse_head and plain_linear_head(head, model.config):
        return algo.linear_token_logprobs(hidden, head.weight, completion_ids, temperature, chunk_rows=1024)
    return algo.token_logprobs(head(hidden), completion_ids, temperature)


def micro_batch(rollout: Rollout, rows: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """Rows `rows` of the rollout, with the padding columns none of them uses trimmed away:
    (prompt ids (b, P'), prompt mask (b, P'), completion ids (b, T'), completion mask (b, T'))."""
    prompt_mask = rollout.prompt_mask[rows]
    completion_mask = rollout.completion_mask[rows]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # leftmost column some prompt uses
    last = int(completion_mask.sum(1).max())  # longest completion
    tensors = (
        rollout.prompt_ids[rows, first:],
        prompt_mask[:, first:],
        rollout.completion_ids[rows, :last],
        completion_mask[:, :last],
    )
    return tuple(tensor.to(device) for tensor in tensors)


def autocast(cfg: Config, device: torch.device):
    """The training forward's mixed-precision context (train.autocast); the backward runs outside it."""
    if cfg.train.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.train.autocast))


def micro_batch_logprobs(
    model, rollout: Rollout, rows: torch.Tensor, cfg: Config, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (b, T'), completion mask (b, T')) of rollout rows `rows` under `model`, differentiable
    unless called under no_grad: the one forward both the update and the frozen passes run."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = micro_batch(rollout, rows, device)
    with autocast(cfg, device):
        logprobs = as_forward(model, completion_logprobs)(  # train.fsdp: FSDP sees a forward
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, cfg.generation.temperature
        )
    # the loss counts the sampled tokens only (an episode's environment turns are attended to, not trained)
    return logprobs, rollout.trained_mask[rows, : completion_mask.shape[1]].to(completion_mask)


@torch.no_grad()
def frozen_logprobs(model, rollout: Rollout, cfg: Config, device) -> torch.Tensor:
    """(B, T) log-probs of the whole rollout under `model` without gradients, micro-batch by micro-batch."""
    out = torch.zeros_like(rollout.logprobs)
    for rows in torch.arange(rollout.completion_ids.shape[0]).split(cfg.train.micro_batch_size):
        logprobs, mask = micro_batch_logprobs(model, rollout, rows, cfg, device)
        out[rows, : logprobs.shape[1]] = logprobs.float().cpu() * mask.cpu()
    return out


def old_and_reference_logprobs(
    setup: StepSetup, rollout: Rollout
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(old (B, T) or None, reference (B, T) or None): the old policy's log-probs when the batch outlives an
    update (mu > 1 or several minibatches); the reference's when beta > 0 (under LoRA: the policy with its
    adapter switched off, no second copy)."""
    cfg = setup.cfg
    old = None
    if cfg.grpo.num_iterations > 1 or cfg.grpo.num_minibatches > 1:
        old = frozen_logprobs(setup.policy, rollout, setup.cfg, setup.device)
    ref = None
    if cfg.grpo.beta > 0:
        reference = setup.ref_model or setup.policy
        with setup.policy.disable_adapter() if setup.ref_model is None else contextlib.nullcontext():
            ref = frozen_logprobs(reference, rollout, setup.cfg, setup.device)
    return old, ref


# --------------------------------------------------------------------------------------------- update


def grpo_loss(
    logprobs: torch.Tensor,  # (b, T') the rows' log-probs under the policy being trained
    batch: ScoredBatch,
    rows: torch.Tensor,  # (b,) which rows of the batch
    mask: torch.Tensor,  # (b, T') completion mask
    minibatch_size: int,  # sequences in the minibatch the gradient is normalised over
    num_tokens: int,  # completion tokens in that minibatch
    cfg: Config,
    entropy_coef: float = 0.0,
) -> algo.PolicyLossOutput:
    """The clipped policy loss of rows `rows` (graft.algo.policy_loss) with the batch's advantages, old and
    reference log-probs; normalised over the whole minibatch so micro-batch gradients add up to it."""
    T, device = logprobs.shape[1], logprobs.device
    old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[rows, :T].to(device)
    ref = None if batch.ref_logprobs is None else batch.ref_logprobs[rows, :T].to(device)
    weights, mismatch = None, None
    if batch.rollout.sampler != "graft":  # another engine's numerics drew the tokens (vLLM): correct for it
        sampled = batch.rollout.logprobs[rows, :T].to(device)
        cap = cfg.grpo.tis_cap
        mismatch = algo.mismatch_metrics(old, sampled, mask, cap).as_dict()
        weights = None if cap is None else algo.truncated_importance_weights(old, sampled, mask, cap)
    out = algo.policy_loss(
        logprobs,
        old,
        batch.advantages[rows].to(device),
        mask,
        loss_type=cfg.grpo.loss_type,
        num_sequences=minibatch_size,
        num_tokens=num_tokens,
        max_completion_length=cfg.generation.max_new_tokens,
        epsilon=cfg.grpo.epsilon,
        epsilon_high=cfg.grpo.epsilon_high,
        delta=cfg.grpo.delta,
        importance_sampling_level=cfg.grpo.importance_sampling_level,
        beta=cfg.grpo.beta,
        ref_logprobs=ref,
        token_weights=weights,
        entropy_coef=entropy_coef,
        entropy_baseline=None
        if batch.rollout.entropy is None
        else batch.rollout.entropy[rows, :T].to(device),
    )
    out.sampler_metrics = mismatch
    return out


def minibatch_backward(
    policy,
    batch: ScoredBatch,
    minibatch: torch.Tensor,
    cfg: Config,
    device,
    fast_path: FastPath | None = None,
    ranks: Ranks = SINGLE,
    entropy_coef: float = 0.0,
) -> tuple[list[algo.PolicyLossOutput], bool]:
    """Accumulate into .grad the gradient of the loss over rows `minibatch`; (the loss of each piece,
    whether it was replayed). The fast path replays the rollout's forward when it recorded one for this
    batch; otherwise a forward and a backward per micro-batch. With several ranks the normalisers count
    every rank's minibatch, so the ranks' gradients add up to the whole step's."""
    rollout = batch.rollout
    counted = (
        torch.ones(len(rollout.completion_ids), dtype=torch.bool)
        if batch.loss_rows is None
        else batch.loss_rows
    )

    def loss(logprobs: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> algo.PolicyLossOutput:
        mask = mask * counted[rows, None].to(mask.device, mask.dtype)  # rows left out by dynamic sampling
        return grpo_loss(logprobs, batch, rows, mask, num_sequences, num_tokens, cfg, entropy_coef)

    num_sequences = max(int(ranks.sum(int(counted[minibatch].sum()))), 1)
    num_tokens = int(ranks.sum(int(rollout.trained_mask[minibatch][counted[minibatch]].sum())))
    if fast_path is not None and len(minibatch) == len(rollout.completion_ids):
        replay_loss = functools.partial(loss, rows=minibatch, mask=rollout.completion_mask.to(device))
        out = fast_path.replay_backward(policy, rollout, cfg.generation.temperature, replay_loss)
        if out is not None:
            return [out], True
    outs = []
    for rows in minibatch.split(cfg.train.micro_batch_size):
        logprobs, mask = micro_batch_logprobs(policy, rollout, rows, cfg, device)
        outs.append(loss(logprobs, rows=rows, mask=mask))
        outs[-1].loss.backward()
    return outs, False


def update_policy(
    policy,
    optimizer,
    scheduler,
    batch: ScoredBatch,
    cfg: Config,
    device,
    params,
    fast_path: FastPath | None = None,
    ranks: Ranks = SINGLE,
    entropy_coef: float = 0.0,
) -> dict:
    """num_iterations passes over the batch, each split into num_minibatches optimizer steps, each made of
    micro-batches whose gradients accumulate (loss normalisers count the whole minibatch, see algo). A
    step whose loss or gradient is not finite is skipped and counted, so one bad batch cannot poison the
    weights or Adam's moments."""
    batch_size = batch.rollout.completion_ids.shape[0]
    losses, clip_fractions, kls, grad_norms, mismatches = [], [], [], [], []
    skipped, replayed = 0, False
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
    policy.train()
    for _ in range(cfg.grpo.num_iterations):
        for minibatch in torch.arange(batch_size).split(batch_size // cfg.grpo.num_minibatches):
            optimizer.zero_grad(set_to_none=True)
            outs, replayed_now = minibatch_backward(
                policy, batch, minibatch, cfg, device, fast_path, ranks, entropy_coef
            )
            replayed = replayed or replayed_now
            # statistics stay on the device until the end: .item() per micro-batch would stall a GPU
            step_loss = torch.stack([out.loss.detach() for out in outs]).sum()
            if ranks.world > 1:  # every rank must agree to step or to skip
                ranks.sum_gradients(params)
                step_loss = torch.tensor(ranks.sum(step_loss.item()))
            clip_fractions.extend(out.clip_fraction for out in outs)
            mismatches.extend(out.sampler_metrics for out in outs if out.sampler_metrics)
            kls.extend(out.kl for out in outs if out.kl is not None)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if torch.isfinite(step_loss) and torch.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                grad_norms.append(grad_norm)
                losses.append(step_loss)
            else:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
    policy.eval()
    if fast_path is not None:
        fast_path.drop_recording()  # an update that did not replay (e.g. skipped rows) must not keep it

    def mean(values: list) -> float | None:
        return torch.stack([torch.as_tensor(v) for v in values]).float().mean().item() if values else None

    return {
        "loss": mean(losses),
        "grad_norm": mean(grad_norms),
        "clip_fraction": mean(clip_fractions),
        "kl": mean(kls),
        "lr": scheduler.get_last_lr()[0],
        "nonfinite_skipped": skipped,
        "replayed": replayed,  # train.replay: backward through the rollout's forward
        "optimizer_steps": cfg.grpo.num_iterations * cfg.grpo.num_minibatches,
        # a rollout engine with its own numerics (vLLM): how far its log-probs are from the trainer's
        **{key: mean([m[key] for m in mismatches]) for key in (mismatches[0] if mismatches else {})},
    }
