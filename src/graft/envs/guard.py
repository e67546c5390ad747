"""Calling user environments without letting one of them stop a rollout: each call runs in a daemon thread
with a deadline, exceptions are caught, and what comes back is checked for type. A failure is reported as
(kind, reason) for that episode alone; the caller ends that episode and goes on.

Why threads and not processes: environments hold arbitrary Python state (a game, a sandbox handle) that
need not pickle, and a call is usually short. A thread cannot be killed, so a call that hangs is abandoned:
it keeps its thread (a daemon, so it never holds up the interpreter's exit) and its instance is never used
again. The calls of one turn run at the same time, so I/O-bound environments (tools, HTTP) overlap; they are
separate instances, but ones sharing module-level state must lock it themselves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from graft.envs.base import Environment, StepResult

ERROR, TIMEOUT, INVALID = "error", "timeout", "invalid"  # failure kinds, counted per rollout


@dataclass(frozen=True)
class Failure:
    kind: str  # ERROR | TIMEOUT | INVALID (and "template", from the sampler)
    reason: str  # for people: what was called and what went wrong

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def call_all(calls: list[Callable[[], Any]], timeout: float | None, what: str) -> list[Any | Failure]:
    """Each call's value, or a Failure when it raised or ran past `timeout` seconds (None: no deadline,
    plain sequential calls, e.g. to debug an environment in a single thread)."""
    if timeout is None:
        return [_guarded(call, what) for call in calls]
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = _guarded(calls[i], what)

    threads = [
        threading.Thread(target=run, args=(i,), daemon=True, name=f"graft-env-{what}")
        for i in range(len(calls))
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    out = []
    for i, thread in enumerate(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
        # read once: a late call writing results[i] after this point is ignored
        out.append(
            Failure(TIMEOUT, f"{what} did not return within {timeout:g} s")
            if thread.is_alive()
            else results[i]
        )
    return out


def _guarded(call: Callable[[], Any], what: str) -> Any | Failure:
    try:
        return call()
    except BaseException as exc:  # noqa: BLE001 - SystemExit inside an environment must not end the run
        if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            raise
        return Failure(ERROR, f"{what} raised {type(exc).__name__}: {exc}")


def make_envs(
    factory: Callable[[], Environment], n: int, timeout: float | None
) -> list[Environment | Failure]:
    """n fresh instances; a factory that raises, hangs or returns something else fails that episode."""
    made = call_all([factory] * n, timeout, "the environment factory")
    return [
        m
        if isinstance(m, (Environment, Failure))
        else Failure(INVALID, f"the environment factory returned {type(m).__name__}, not an Environment")
        for m in made
    ]


def check_reset(value: Any) -> str | Failure:
    if isinstance(value, (Failure, str)):
        return value
    return Failure(INVALID, f"reset returned {type(value).__name__}, expected str (the first user message)")


def check_step(value: Any) -> StepResult | Failure:
    """A StepResult with plain types (info copied to a dict), or why not."""
    if isinstance(value, Failure):
        return value
    if not isinstance(value, StepResult):
        return Failure(INVALID, f"step returned {type(value).__name__}, expected StepResult")
    done = value.done
    if not (isinstance(done, bool) or type(done).__name__ == "bool_"):  # numpy's bool is fine
        return Failure(INVALID, f"step returned done of type {type(done).__name__}, expected bool")
    if not bool(done) and not isinstance(value.observation, str):
        return Failure(
            INVALID, f"step returned observation of type {type(value.observation).__name__}, expected str"
        )
    if bool(done) and value.observation is not None and not isinstance(value.observation, str):
        return Failure(
            INVALID,
            f"step returned observation of type {type(value.observation).__name__}, expected str or None",
        )
    info = {} if value.info is None else value.info
    if not isinstance(info, Mapping):
        return Failure(INVALID, f"step returned info of type {type(info).__name__}, expected dict")
    return StepResult(value.observation, bool(done), dict(info))
