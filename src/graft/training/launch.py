"""`graft train --nproc N`: start N training processes on this machine through torchrun, and pass a
Ctrl-C on to them once, so each finishes its step and the run checkpoints (graft.training.distributed).

torchrun runs in its own session: the terminal's Ctrl-C reaches only this process, which sends torchrun a
single SIGINT; torchrun forwards it to every worker and waits up to --shutdown_timeout for them to save.
A second Ctrl-C (or SIGTERM) stops every process at once, as in a single-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_torchrun(args: list[str]) -> int:
    """torchrun itself, minus its report of a worker's non-zero exit (a Python traceback and a failure
    table): graft's rank 0 has printed what went wrong and how to go on, so only its exit code is kept
    (130 after a Ctrl-C, 1 or 2 after an error)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15 -> 143
    except SignalException:
        return 130
    return 0


def torchrun_command(nproc: int, graft_args: list[str], shutdown_timeout: float | None) -> list[str]:
    """The torchrun command line that runs `graft <graft_args>` in `nproc` processes on this machine."""
    from torch.distributed import run as torchrun

    command = [sys.executable, "-m", "graft.training.launch", "--standalone", f"--nproc_per_node={nproc}"]
    if shutdown_timeout is not None and "--shutdown_timeout" in torchrun.get_args_parser().format_help():
        # room for the step in flight (train.stop_timeout) and its checkpoint before torchrun kills workers
        command.append(f"--shutdown_timeout={int(shutdown_timeout) + 120}")
    return [*command, "-m", "graft", *graft_args]


def launch(nproc: int, graft_args: list[str], shutdown_timeout: float | None) -> int:
    """Run `graft <graft_args>` in `nproc` processes; the exit code of the run (torchrun's)."""
    env = dict(os.environ)
    env.setdefault("LOGLEVEL", "ERROR")  # torchrun's own log lines (graft's rank 0 reports the run)
    if "OMP_NUM_THREADS" not in env:  # torchrun would pin each worker to 1 thread; graft shares the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    proc = subprocess.Popen(
        torchrun_command(nproc, graft_args, shutdown_timeout), env=env, start_new_session=True
    )
    received = 0

    def forward(signum, frame) -> None:
        nonlocal received
        received += 1
        if received == 1:
            os.kill(proc.pid, signal.SIGINT)  # torchrun passes it to each worker: finish the step, save
        else:
            os.killpg(proc.pid, signal.SIGTERM)  # everyone, now: a second signal aborts as it does alone

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # what torchrun_command runs: torchrun, quieter
    sys.exit(run_torchrun(sys.argv[1:]))
