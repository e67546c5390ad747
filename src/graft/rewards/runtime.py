"""Runs reward functions so that none of them can stall or kill a run.

Built-in rewards (pure Python, tested) run in-process. User rewards run in worker processes: a call that
raises becomes the configured fallback and is counted, a call that outlives its timeout is stopped by
killing its worker (a fresh one takes its place), and past `max_failure_rate` the run stops with the first
traceback and the completion that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import importlib
import importlib.util
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.config import ConfigError
from graft.rewards.builtin import BUILTIN_REWARDS, runs_in_process


class RewardError(RuntimeError):
    """Reward functions failed too often; the message holds the first traceback and its completion."""


def load_reward(spec: str):
    """A built-in name, `path/to/file.py:function` or `package.module:function` -> the callable."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(BUILTIN_REWARDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"reward '{spec}' is not built in ({', '.join(sorted(BUILTIN_REWARDS))}){hint} and is not of the "
            "form path/to/file.py:function or package.module:function"
        )
    target, _, name = spec.rpartition(":")
    if ("/" in target or "\\" in target) and not target.endswith(".py"):
        raise ConfigError(f"reward '{spec}': a reward file must be a .py file (path/to/file.py:function)")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConfigError(f"reward file '{target}' does not exist")
            module_spec = importlib.util.spec_from_file_location(f"graft_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except (Exception, SystemExit) as exc:  # the user's module failed to import: say which and why
        raise ConfigError(f"reward '{spec}': importing {target} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward '{spec}': {target} has no function '{name}'")
    return fn


def call_reward(fn, prompts: list, completions: list, columns: dict[str, list]) -> list[float | None]:
    """Call as TRL does (keywords), await a coroutine function, and check the answer's shape."""
    out = fn(prompts=prompts, completions=completions, **columns)
    if asyncio.iscoroutine(out):
        out = asyncio.run(out)
    out = list(out)
    if len(out) != len(completions):
        raise ValueError(f"returned {len(out)} values for {len(completions)} completions")
    values = []
    for v in out:
        if v is None:
            values.append(None)
        else:
            v = float(v)
            values.append(v if math.isfinite(v) else math.nan)  # NaN/inf: counted, then treated as None
    return values


def _worker_main(conn) -> None:
    # A terminal's Ctrl-C reaches the whole process group (and torchrun signals a worker's group): the
    # training process decides how to stop and ends this worker itself, so a Ctrl-C must not kill it
    # in the middle of scoring the step the run is finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded: dict[str, Any] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        spec, prompts, completions, columns = message
        try:
            if spec not in loaded:
                loaded[spec] = load_reward(spec)
            conn.send(("ok", call_reward(loaded[spec], prompts, completions, columns)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent as text
            conn.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx):
        self.ctx = ctx
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.process = self.ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def send(self, message) -> None:
        self.conn.send(message)

    def receive(self):
        """("ok", values) or ("error", traceback); a worker that died mid-call is replaced."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.restart()
            return ("error", "the reward worker process died (crashed or was killed)")

    def restart(self) -> None:
        self.process.kill()  # SIGKILL: a hung C extension or sleep cannot ignore it
        self.process.join()
        self.conn.close()
        self._start()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):  # already gone
            self.conn.send(None)
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()


@dataclass
class RewardStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    nan: int = 0
    values: int = 0  # completions scored
    failed_values: int = 0  # of those: in a call that raised or timed out, or NaN/inf
    first_failure: str | None = None
    reported: bool = False  # first_failure handed to the console (new_failures)


@dataclass
class RewardRuntime:
    specs: list[str]
    timeout: float = 10.0
    num_workers: int = 2
    on_error: str = "exclude"  # or "zero"
    max_failure_rate: float = 0.5
    min_calls: int = 4  # the failure rate is judged only after this many calls of a function
    completion_format: str = "messages"  # what user functions receive, as TRL gives chat-prompted data
    functions: dict[str, Any] = field(default_factory=dict)  # already loaded (by the checks), by spec
    stats: dict[str, RewardStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every spec fails here, not later; ones the checks already imported are not imported again
        self.functions = {spec: self.functions.get(spec) or load_reward(spec) for spec in self.specs}
        self.stats = {spec: RewardStats() for spec in self.specs}
        user = [s for s in self.specs if not runs_in_process(s)]
        ctx = mp.get_context("spawn")  # fork after torch's thread pools start can deadlock the child
        self.workers = [_Worker(ctx) for _ in range(min(self.num_workers, max(len(user), 1)))] if user else []

    def scorer(self, spec: str) -> Callable[..., list[float]]:
        """One of the functions as a plain reward function f(prompts, completions, **columns), still run
        through this runtime (workers, timeouts): how accuracy is computed in training, eval and compare."""

        def score_one(prompts, completions, **columns) -> list[float]:
            return self.score(prompts, completions, columns, only=spec)[spec]

        return score_one

    def score(
        self, prompts: list, completions: list, columns: dict[str, list], only: str | None = None
    ) -> dict[str, list[float]]:
        """{spec: one value per completion, NaN where the function gave None, failed or timed out
        (0.0 instead with on_error='zero')}; `only` scores a single one of the specs."""
        specs = [only] if only else self.specs
        results: dict[str, list[float]] = {}
        # a multi-turn episode arrives as its messages already (graft.envs.episode.Episode.completion_messages)
        as_messages = [
            c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions
        ]
        user_completions = as_messages if self.completion_format == "messages" else completions
        queue = []
        for spec in specs:
            if runs_in_process(spec):  # ours, proven fast and safe: plain text, in-process
                results[spec] = self._finish(
                    spec, *self._run_inline(spec, prompts, completions, columns), completions
                )
            else:
                queue.append(spec)
        # one call per idle worker; each call has its own deadline, and a late one kills only its worker
        busy: dict[_Worker, tuple[str, float]] = {}
        while queue or busy:
            for worker in self.workers:
                if worker not in busy and queue:
                    spec = queue.pop(0)
                    sent = completions if spec in BUILTIN_REWARDS else user_completions  # ours take text
                    worker.send((spec, prompts, sent, columns))
                    busy[worker] = (spec, time.monotonic() + self.timeout)
            next_deadline = min(deadline for _, deadline in busy.values())
            ready = mp_connection.wait(
                [w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic())
            )
            now = time.monotonic()
            for worker in list(busy):
                spec, deadline = busy[worker]
                if worker.conn in ready:
                    status, payload = worker.receive()
                elif now >= deadline:
                    worker.restart()
                    status, payload = "timeout", None
                else:
                    continue
                del busy[worker]
                results[spec] = self._finish(spec, status, payload, completions)
        return {spec: results[spec] for spec in specs}

    def _run_inline(self, spec, prompts, completions, columns):
        try:
            return "ok", call_reward(self.functions[spec], prompts, completions, columns)
        except Exception:
            return "error", traceback.format_exc()

    def _finish(self, spec: str, status: str, payload, completions: list) -> list[float]:
        stats = self.stats[spec]
        stats.calls += 1
        stats.values += len(completions)
        fallback = 0.0 if self.on_error == "zero" else math.nan
        if status == "ok":
            values = [math.nan if v is None else v for v in payload]
            bad = [
                i
                for i, (v, raw) in enumerate(zip(values, payload, strict=True))
                if raw is not None and math.isnan(v)
            ]
            stats.nan += len(bad)
            stats.failed_values += len(bad)
            if bad and stats.first_failure is None:
                stats.first_failure = (
                    f"returned NaN or inf for {len(bad)} of {len(values)} completions (NaN is not 'no score': "
                    f"return None for that); first such completion: {completions[bad[0]]!r}"
                )[:4000]
            self._check_rate(spec)
            return values
        stats.failed_values += len(completions)
        if status == "timeout":
            stats.timeouts += 1
            detail = f"timed out after {self.timeout:g} s (reward timeout: rewards.timeout)"
        else:
            stats.errors += 1
            detail = short_traceback(payload)
        if stats.first_failure is None:
            sample = completions[0] if completions else ""
            stats.first_failure = f"{detail}\nfirst completion of that batch: {sample!r}"[:4000]
        self._check_rate(spec)
        return [fallback] * len(completions)

    def _check_rate(self, spec: str, final: bool = False) -> None:
        """The max_failure_rate rule: calls that raised or timed out and NaN/inf values alike, as a share
        of the completions scored; judged after min_calls calls, or on whatever there is when `final`."""
        stats = self.stats[spec]
        if not stats.values or (stats.calls < self.min_calls and not final):
            return
        if stats.failed_values / stats.values > self.max_failure_rate:
            failures = stats.errors + stats.timeouts
            parts = [f"failed in {failures} of {stats.calls} calls"] if failures else []
            if stats.nan:
                parts.append(f"returned NaN/inf for {stats.nan} of {stats.values} completions")
            share = stats.failed_values / stats.values
            raise RewardError(
                f"reward '{spec}' {' and '.join(parts)}: {share:.0%} of its scores are missing (limit "
                f"rewards.max_failure_rate={self.max_failure_rate}); first failure:\n{stats.first_failure}"
            )

    def final_check(self) -> None:
        """The failure rule once more at the end of a run, however few calls there were: a 2-step run whose
        reward failed every time must not end as a success."""
        for spec in self.specs:
            self._check_rate(spec, final=True)

    def new_failures(self) -> list[tuple[str, str]]:
        """(spec, its first failure) for each function that failed since the last call: what the console
        shows once per function, so a broken reward is seen at once, not only in metrics.jsonl."""
        out = []
        for spec, stats in self.stats.items():
            if stats.first_failure is not None and not stats.reported:
                stats.reported = True
                out.append((spec, stats.first_failure))
        return out

    def metrics(self) -> dict[str, float]:
        out = {}
        for spec, s in self.stats.items():
            name = reward_name(spec)
            out[f"reward/{name}/errors"] = s.errors
            out[f"reward/{name}/timeouts"] = s.timeouts
            out[f"reward/{name}/nan"] = s.nan
        return out

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def short_traceback(text: str) -> str:
    """A reward's traceback as one line: the exception and where the reward's own code raised it."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Traceback"):
        return str(text)
    frames = [line.strip() for line in lines if line.strip().startswith('File "')]
    where = f" ({frames[-1].replace('File ', '', 1)})" if frames else ""
    return f"{lines[-1].strip()}{where}"


def reward_name(spec: str) -> str:
    """A short metric name: the function name for `file.py:fn` and `module:fn` specs."""
    return spec.rpartition(":")[2] if ":" in spec else spec
