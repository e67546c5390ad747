"""A GRPO run around its steps: checks and setup once, then grpo_step after grpo_step, with the
bookkeeping each step needs (metrics, completions log, health alarms, evaluation, checkpoints, stopping),
and the final adapter, evaluation and report. The step itself is graft.training.grpo.grpo_step."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from graft.batch import ScoredBatch
from graft.config import Config
from graft.cpu.fast_path import FastPath
from graft.cpu.plan import plan_fast_paths
from graft.envs.chat import check_chat_template
from graft.envs.loading import load_environment
from graft.evaluation import evaluate
from graft.health import HealthMonitor
from graft.models import add_lora, load_model, merged_adapter, stop_token_ids
from graft.report import write_report
from graft.rewards.runtime import RewardError, RewardRuntime
from graft.rollout.backends import make_backend
from graft.tasks import environment_spec
from graft.tracking import ProgressDisplay, Tracker
from graft.training.checkpoint import (
    load_trainer_state,
    remove_torn_saves,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
)
from graft.training.distributed import SINGLE, Ranks, init_ranks, rank_device
from graft.training.episodes import evaluate_episodes
from graft.training.fsdp import full_weights, gathered_model_state, gathered_state, is_sharded, shard
from graft.training.gate import GateError, run_gate
from graft.training.grpo import grpo_step
from graft.training.order import PromptOrder
from graft.training.records import completion_rows
from graft.training.run import RunDir, StopRequest, build_optimizer, setup_process
from graft.training.setup import StepSetup
from graft.training.sft import warm_start
from graft.validate import Checked, validate_or_raise


class TrainingInterrupted(Exception):
    """The run stopped early on request (signal or stop_after) after saving a checkpoint at `step`."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped after step {step}; checkpoint saved in {run_dir / 'checkpoints'}")
        self.step, self.run_dir = step, run_dir


class TrainingError(RuntimeError):
    """The run cannot go on (evaluation.g. updates that stay non-finite); the message says what to change."""


def setup_training(
    cfg: Config, checks: Checked, display: ProgressDisplay, ranks: Ranks = SINGLE
) -> tuple[StepSetup, RewardRuntime]:
    """Everything built once: reward runtimes, model (+ LoRA, + a frozen reference for full fine-tuning with
    beta > 0), the fast path the plan takes for the loaded model, optimizer and the rollout generator.
    Returns the step setup and the runtime that judges correctness (the rewards' own when they include
    it; else a separate one, because math-verify may hang and never runs unguarded in this process)."""
    task = checks.task
    reward_cfg = cfg.rewards
    functions = reward_cfg.functions or list(task.default_rewards)
    rewards = RewardRuntime(
        functions,
        reward_cfg.timeout,
        reward_cfg.num_workers,
        reward_cfg.on_error,
        reward_cfg.max_failure_rate,
        completion_format=reward_cfg.completion_format,
        functions=checks.rewards,
    )
    correctness_name = task.default_rewards[0]
    correctness_runtime = (
        rewards if correctness_name in functions else RewardRuntime([correctness_name], reward_cfg.timeout, 1)
    )

    policy, tokenizer = load_model(cfg.model)
    device = next(policy.parameters()).device
    ref_model = None
    if cfg.grpo.beta > 0 and not cfg.lora.enabled:  # full fine-tuning needs a frozen copy; LoRA does not
        ref_model = copy.deepcopy(policy).requires_grad_(False)
    if cfg.lora.enabled:
        policy = add_lora(policy, cfg.lora, cfg.train.seed)
    # non-reentrant checkpointing: needs no gradient on the (frozen) embeddings' output
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.fsdp:  # before the optimizer: it holds this rank's shards only
        policy = shard(policy, ranks)
        ref_model = ref_model and shard(ref_model, ranks)
    # the config's plan, settled for this model
    paths = plan_fast_paths(cfg, device, model=policy, world=ranks.world)
    replay = paths.why.get("replayed update", "on")
    if cfg.train.replay and replay != "on":
        display.print(f"[dim]train.replay: not used, a second forward per update: {escape(replay[5:])}[/dim]")
    # before the optimizer's state: a vLLM engine checks that its share of the GPU is free
    backend = make_backend(cfg, device, policy)
    backend.sync_weights(policy)
    if backend.name != "graft":
        display.print(f"rollouts: {backend.name} (the policy's weights loaded into it before every rollout)")
    environment = load_environment(spec) if (spec := environment_spec(cfg.task)) else None
    if environment is not None and check_chat_template(tokenizer, task.system_prompt):
        display.print(
            "[yellow]the chat template drops earlier replies' <think> blocks[/yellow]: episodes keep each "
            "reply as sampled, reasoning included (the context the model played with), and render only the "
            "environment's turns from the template (graft.envs.chat)"
        )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg)
    setup = StepSetup(
        cfg=cfg,
        task=task,
        policy=policy,
        tokenizer=tokenizer,
        stop_ids=stop_token_ids(policy, tokenizer),
        rewards=rewards,
        reward_weights=reward_cfg.weights or [1.0] * len(functions),
        correctness_name=correctness_name,
        correctness=correctness_runtime.scorer(correctness_name),
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        # each rank draws its own samples: the same seed would correlate the ranks' groups
        generator=torch.Generator(device=device).manual_seed(cfg.train.seed + ranks.rank),
        device=device,
        fast_path=FastPath.build(policy, paths),
        ref_model=ref_model,
        backend=backend,
        environment=environment,
        ranks=ranks,
    )
    return setup, correctness_runtime


class NoTracker:
    """The tracker of a rank that is not the main one: the main rank writes the run's records."""

    def write(self, row: dict) -> None:
        pass

    def write_completions(self, rows: list) -> None:
        pass

    def close(self) -> None:
        pass


class Bookkeeping:
    """What a run keeps between steps besides the model: the run directory, prompt order, metrics and
    completions logs, health monitor, evaluation history and the non-finite streak; evaluation and
    checkpoints (both read and write it)."""

    def __init__(
        self, cfg: Config, setup: StepSetup, run: RunDir, display: ProgressDisplay, state: dict | None
    ):
        self.cfg, self.setup, self.run, self.display = cfg, setup, run, display
        t = cfg.train
        self.order = PromptOrder(setup.task, t.seed, t.skip_solved, t.revisit_after)
        self.health = HealthMonitor(cfg.health)
        self.nonfinite_streak, self.eval_history, self.first_step = 0, {}, 1
        self.train_seconds = 0.0  # the steps' time, for train.max_minutes (kept across a resume)
        if state is not None:
            trainer_state = state["trainer_state"]
            self.first_step = state["step"] + 1
            self.nonfinite_streak = trainer_state.get("nonfinite_streak", 0)
            self.train_seconds = trainer_state.get("train_seconds", 0.0)
            self.eval_history = {
                k: v for k, v in run.read_json("eval.json").items() if v["step"] <= state["step"]
            }
            if "health" in trainer_state:
                self.health.restore(trainer_state["health"])
            if "entropy_control" in trainer_state:
                setup.entropy_control.restore(trainer_state["entropy_control"])
        # on resume, records after the checkpoint are redone; a fresh start in an old folder drops them all
        keep_until = self.first_step - 1 if state else -1
        self.tracker = Tracker(run.path, cfg, keep_until_step=keep_until) if setup.ranks.main else NoTracker()

    def evaluate(self, tag: str, step: int) -> float:
        """Held-out accuracy now (greedy unless eval.* asks for samples), recorded in eval.json under `tag`.
        With train.ema_decay the model evaluated is the weight average, as the final model will be."""
        # its own generator: pass@k sampling must not move the training sampler's random sequence
        generator = torch.Generator(device=self.setup.device).manual_seed(self.cfg.train.seed + step)
        with self.setup.weight_average.swapped_in():
            result = self._held_out(generator)
        self.eval_history[tag] = {"step": step, **result.to_dict()}
        self.run.write_json("eval.json", self.eval_history)
        return result.accuracy

    def _held_out(self, generator: torch.Generator):
        evaluation, setup = self.cfg.eval, self.setup
        if setup.environment is not None:  # multi-turn: greedy episodes against the task's environment
            return evaluate_episodes(setup, evaluation.num_prompts, evaluation.batch_size, generator)
        with merged_adapter(setup.policy, self.cfg.generation.merge_adapter):
            return evaluate(
                setup.policy,
                setup.tokenizer,
                setup.task,
                setup.correctness,
                max_new_tokens=evaluation.max_new_tokens or self.cfg.generation.max_new_tokens,
                stop_ids=setup.stop_ids,
                num_problems=evaluation.num_prompts,
                batch_size=evaluation.batch_size,
                num_samples_kept=evaluation.num_samples_kept,
                num_samples=evaluation.num_samples,
                temperature=evaluation.temperature,
                generator=generator,
            )

    def checkpoint(self, step: int) -> None:
        setup = self.setup
        trainer_state = {
            "order": self.order.state(),
            "nonfinite_streak": self.nonfinite_streak,
            "train_seconds": self.train_seconds,
            "health": self.health.state(),
            "entropy_control": setup.entropy_control.state(),
            "weight_average": setup.weight_average.state(),
            "config": self.cfg.model_dump(mode="json"),
        }
        if setup.ranks.world > 1:  # each rank's random state is its own
            trainer_state["rank_rng"] = setup.ranks.gather_objects(rng_state(setup.generator))
        if setup.ranks.world > 1 and not is_sharded(setup.policy):  # replicated: the same weights everywhere
            sums = setup.ranks.gather_objects([float(p.detach().double().sum()) for p in setup.params])
            trainer_state["rank_weight_sums"] = sums
            if any(s != sums[0] for s in sums):  # summed gradients keep them equal; anything else is a bug
                raise TrainingError(f"step {step}: the processes' weights differ ({sums[0][:3]} vs others)")
        # train.fsdp: every rank sends its shards to the main rank, which writes them whole
        model_state, optimizer_state = (
            gathered_state(setup.policy, setup.optimizer) if is_sharded(setup.policy) else (None, None)
        )
        if not setup.ranks.main:
            setup.ranks.barrier()  # the main rank writes; the others wait until the checkpoint is whole
            return
        save_checkpoint(
            self.run.path / "checkpoints",
            step,
            model=setup.policy,
            tokenizer=setup.tokenizer,
            optimizer=setup.optimizer,
            scheduler=setup.scheduler,
            trainer_state=trainer_state,
            generator=setup.generator,
            keep_last_n=self.cfg.checkpoint.keep_last_n,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        setup.ranks.barrier()

    def budget_spent(self) -> bool:
        """train.max_minutes spent on steps, this run's and those before a resume."""
        budget = self.cfg.train.max_minutes
        return budget is not None and self.train_seconds >= 60 * budget

    def is_last_step(self, step: int, seconds: float) -> bool:
        """max_steps reached, or train.max_minutes spent on steps (every rank agrees)."""
        self.train_seconds += seconds
        return self.setup.ranks.any(step == self.cfg.train.max_steps or self.budget_spent())

    def after_step(self, step: int, batch: ScoredBatch, metrics: dict, stopping: bool, last: bool) -> None:
        """The weight average, prompt selection's record, health alarms, completions log, the non-finite
        rule, periodic evaluation and checkpoint, the metrics row and the progress display, in that order."""
        cfg, display = self.cfg, self.display
        self.setup.weight_average.after_step()
        self.order.record(batch.solved)
        metrics.update(self.order.metrics())
        report_reward_failures(self.setup.rewards, display)
        if last:  # the failure rule on the whole run, however short, before its end
            try:
                self.setup.rewards.final_check()
            except RewardError:
                self.tracker.write(metrics)
                raise
        for alarm in self.health.check(metrics):
            display.print(f"[bold yellow]health:[/bold yellow] {escape(alarm.message())}")
        rows = [row for part in self.setup.ranks.gather_objects(completion_rows(step, batch)) for row in part]
        self.tracker.write_completions(rows)
        if cfg.logging.completions_every and step % cfg.logging.completions_every == 0:
            display.completions_table(step, rows)
        all_skipped = metrics["nonfinite_skipped"] == metrics["optimizer_steps"]
        self.nonfinite_streak = self.nonfinite_streak + 1 if all_skipped else 0
        if self.nonfinite_streak >= cfg.train.max_nonfinite_steps:
            self.tracker.write(metrics)
            raise TrainingError(
                f"step {step}: the loss or gradient was not finite in every update of the last "
                f"{self.nonfinite_streak} steps, so the weights were left as they were and the run stops. "
                f"Batch prompts: {[p.prompt for p in batch.problems]}. Try a lower train.learning_rate, "
                "rewards on a sane scale (or grpo.scale_rewards=group), or train.max_grad_norm."
            )
        final_eval_follows = cfg.eval.at_end and last
        if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and not final_eval_follows:
            with full_weights(self.setup.policy):
                if self.setup.ranks.main:  # one evaluation for the run; the other ranks wait for it
                    metrics["eval/accuracy"] = self.evaluate(f"step_{step}", step)
                self.setup.ranks.barrier()
        every = cfg.checkpoint.every_n_steps
        if last or stopping or (every and step % every == 0):
            self.checkpoint(step)
        self.tracker.write(metrics)
        display.update(step, metrics)


def report_reward_failures(rewards: RewardRuntime, display: ProgressDisplay) -> None:
    """The first failure of each reward, on the console as it happens (metrics.jsonl has the counts)."""
    for spec, failure in rewards.new_failures():
        lines = [line for line in failure.splitlines() if line.strip()]
        shown = "\n  ".join(lines[-3:])  # the exception line and the completion, not the whole traceback
        display.print(
            f"[bold yellow]reward '{escape(spec)}' failed[/bold yellow] (first time; such scores are left out "
            f"of the mean, see rewards.on_error):\n  {escape(shown)}"
        )


def train(cfg: Config, console=None, stop_after: int | None = None) -> Path:
    """Run GRPO as configured; returns the run directory. stop_after=k stops after step k exactly as a
    Ctrl-C would (checkpoint, then TrainingInterrupted), for notebooks and tests."""
    ranks, made_group = init_ranks(cfg.model.device)
    if ranks.world > 1:
        cfg = cfg.model_copy(deep=True)  # the caller's config object stays as given
        cfg.model.device = rank_device(cfg.model.device, ranks)
        console = console if ranks.main else Console(file=io.StringIO())  # one process prints
    # every config, data, path, disk and memory problem, before any loading
    checks = validate_or_raise(cfg, world=ranks.world)
    run, resume_from = ranks.broadcast(RunDir.for_config(cfg))  # a generated run name is the main rank's
    ranks.barrier()  # every rank has checked the run directory before the main rank creates it
    budget = cfg.train.max_minutes
    display = ProgressDisplay(
        cfg.train.max_steps, cfg.logging.progress, console, budget_s=budget and 60 * budget
    )
    if budget is not None:
        display.print(
            f"time budget: the run ends after {budget:g} min of steps or at step {cfg.train.max_steps}"
        )
    if checks.memory is not None:
        display.print(f"memory estimate: {checks.memory.describe()}")
    for line in checks.paths.report_lines() if checks.paths else []:
        display.print(escape(line))
    for note in checks.notes:
        display.print(f"[yellow]{escape(note)}[/yellow]")
    state = load_trainer_state(resume_from) if resume_from else None
    if state is not None and checks.resume_changes:
        display.print(
            f"[yellow]resuming with changed settings[/yellow] (recorded in config.from-step-"
            f"{state['step'] + 1:06d}.yaml; config.yaml keeps what the earlier steps used):\n  "
            + "\n  ".join(escape(c) for c in checks.resume_changes)
        )
    if state is not None:
        saved_seed = state["trainer_state"]["config"]["train"]["seed"]
        if saved_seed != cfg.train.seed:
            display.print(
                f"[yellow]resuming with seed {saved_seed} from the checkpoint[/yellow] "
                f"(the config says {cfg.train.seed}; a run keeps the seed it started with)"
            )
            cfg = cfg.model_copy(deep=True)  # the caller's config object stays as given
            cfg.train.seed = saved_seed
    if cfg.sft.enabled:  # the chained recipe: SFT warm-up in <run>/sft, then GRPO starts from its result
        cfg = warm_start(cfg, checks.task, run.path / "sft", display.console)
    if cfg.logging.print_config:
        display.print(f"[bold]graft[/bold] run directory: {run.path}\n[dim]{escape(cfg.to_yaml())}[/dim]")
    deterministic_before = torch.are_deterministic_algorithms_enabled()  # process-wide: put back at the end
    setup_process(cfg.train)

    setup, correctness_runtime = setup_training(cfg, checks, display, ranks)
    if ranks.main:
        run.create(cfg, state["step"] if state else None, checks.resume_changes)
    ranks.barrier()
    books = Bookkeeping(cfg, setup, run, display, state)
    if state is not None:
        restore_checkpoint(
            resume_from, state, setup.policy, setup.optimizer, setup.scheduler, books.order, setup.generator,
            ranks.rank,
        )  # fmt: skip
        setup.weight_average.restore(state["trainer_state"].get("weight_average"))
        display.print(f"resuming {run.path.name} from {resume_from.name} (step {state['step']})")
    if ranks.main:
        remove_torn_saves(run.path / "checkpoints")
    try:
        if cfg.gate.enabled and state is None and setup.environment is not None:
            display.print("[dim]gate: not run for multi-turn tasks (it probes single completions)[/dim]")
        elif cfg.gate.enabled and state is None:
            gate_failure = None
            with full_weights(setup.policy):
                if ranks.main:  # one probe decides for every rank
                    try:
                        run_gate(setup, correctness_runtime, run, display)
                    except GateError as exc:
                        gate_failure = exc
                    finally:
                        report_reward_failures(setup.rewards, display)
                gate_failure = ranks.broadcast(gate_failure)
            if gate_failure:
                raise gate_failure
        if cfg.eval.at_start and state is None:
            display.print("evaluating the starting model on the held-out split ...")
            with full_weights(setup.policy):
                if ranks.main:
                    accuracy = books.evaluate("before", 0)
                    display.print(f"held-out accuracy before training: {accuracy:.3f}")
                    books.tracker.write({"step": 0, "eval/accuracy": accuracy})
                ranks.barrier()
        display.start(books.first_step - 1, spent_s=books.train_seconds)
        step = books.first_step - 1
        steps = range(books.first_step, cfg.train.max_steps + 1)
        if books.budget_spent():  # a resumed run that had ended on its time budget: no step past it
            display.print(
                f"[yellow]train.max_minutes={cfg.train.max_minutes:g} is already spent[/yellow] by the "
                f"{step} steps done; raise it to train further"
            )
            steps = range(0)
        with StopRequest(cfg.train.stop_timeout) as stop:
            for step in steps:
                batch, metrics = grpo_step(setup, books.order.next_problems)
                stop.step_done()
                stopping = ranks.any(stop.requested or step == stop_after)  # every rank stops together
                last = books.is_last_step(step, metrics["time/step"])
                books.after_step(step, batch, {"step": step, **metrics}, stopping, last)
                if stopping and not last:
                    raise TrainingInterrupted(step, run.path)
                if last:
                    break
        display.close()
        final_state = gathered_model_state(setup.policy) if is_sharded(setup.policy) else None
        with full_weights(setup.policy):
            if ranks.main:
                with setup.weight_average.swapped_in():  # train.ema_decay: the final model is the average
                    save_model(setup.policy, setup.tokenizer, run.path / "final", final_state)
                if cfg.eval.at_end:
                    accuracy = books.evaluate("after", step)
                    books.tracker.write({"step": step, "eval/accuracy": accuracy})
            ranks.barrier()
    except BaseException:
        if ranks.main:
            with contextlib.suppress(Exception):  # best effort: the error that stopped the run matters more
                display.print(f"report so far: {write_report(run.path)}")
        raise
    finally:
        display.close()
        books.tracker.close()
        setup.rewards.close()
        correctness_runtime.close()
        torch.use_deterministic_algorithms(deterministic_before)
        if made_group:
            torch.distributed.destroy_process_group()
    if not ranks.main:
        return run.path
    report = write_report(run.path)
    run.print_summary(display, books.eval_history, report)
    return run.path
