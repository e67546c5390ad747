"""Checkpoints that survive interruption, and resume that continues exactly where the run stopped."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from graft.config import load_config
from graft.rewards import builtin
from graft.training.loop import TrainingInterrupted, train

# timing metrics differ between any two runs; everything else must match bit for bit
TIMING = ("tokens_per_s", "time/step", "time/rollout", "time/reward", "time/train")


def digit_share(prompts, completions, **_):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "digit_share", digit_share)


def resume_config(model_dir, out_dir, name, *overrides):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "rewards.functions=[digit_share]",
            "task.num_train=12",  # 2 prompts a step: the data order wraps into a new epoch mid-run
            "task.num_eval=4",
            "grpo.num_generations=3",
            "grpo.num_iterations=2",
            "generation.max_new_tokens=6",
            "train.max_steps=8",
            "train.prompts_per_step=2",
            "train.micro_batch_size=4",
            "train.learning_rate=0.01",
            "train.lr_scheduler=cosine",
            "train.warmup_steps=2",
            "train.deterministic=true",
            "eval.every_n_steps=3",
            "checkpoint.every_n_steps=2",
            f"logging.output_dir={out_dir}",
            f"logging.run_name={name}",
            "logging.progress=lines",
            "logging.print_config=false",
            "gate.enabled=false",  # a random model: correctness is zero by construction
            *overrides,
        ],
    )


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def final_weights(run_dir):
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def same_final_weights(run_a, run_b) -> bool:
    a, b = final_weights(run_a), final_weights(run_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def straight_and_resumed(model_dir, out_dir, *overrides, stop_after=5):
    """The same run twice: straight through, and stopped after `stop_after` steps then resumed."""
    straight = train(resume_config(model_dir, out_dir, "straight", *overrides))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(resume_config(model_dir, out_dir, "resumed", *overrides), stop_after=stop_after)
    assert stopped.value.step == stop_after
    return straight, train(resume_config(model_dir, out_dir, "resumed", *overrides, "resume=auto"))


@pytest.mark.parametrize("stop_after", [4, 5])  # N/2 of N = 8, and a step between checkpoints
def test_resume_is_bit_identical_to_a_straight_run(tiny_model_dir, tmp_path, stop_after):
    straight, resumed = straight_and_resumed(tiny_model_dir, tmp_path, stop_after=stop_after)

    assert resumed == straight.parent / "resumed"
    assert metrics(resumed) == metrics(straight)
    assert same_final_weights(straight, resumed)
    assert json.loads((resumed / "eval.json").read_text()).keys() == {"before", "step_3", "step_6", "after"}


def test_resume_from_an_explicit_checkpoint_path_and_seed_from_the_checkpoint(
    tiny_model_dir, tmp_path, capsys
):
    with pytest.raises(TrainingInterrupted):
        train(resume_config(tiny_model_dir, tmp_path, "run"), stop_after=4)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000004"
    run = train(resume_config(tiny_model_dir, tmp_path, "ignored", f"resume={checkpoint}", "train.seed=99"))
    assert run == tmp_path / "run"
    assert "seed 0 from the checkpoint" in capsys.readouterr().out
    steps = [m["step"] for m in metrics(run) if "loss" in m]
    assert steps == list(range(1, 9))  # steps 1-4 kept, 5-8 appended, nothing twice


def test_resume_auto_without_a_checkpoint_starts_fresh(tiny_model_dir, tmp_path):
    run = train(resume_config(tiny_model_dir, tmp_path, "fresh", "resume=auto", "train.max_steps=2"))
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2]


def test_keep_last_n_and_latest_pointer(tiny_model_dir, tmp_path):
    run = train(resume_config(tiny_model_dir, tmp_path, "keep", "checkpoint.every_n_steps=1",
                              "checkpoint.keep_last_n=2"))  # fmt: skip
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-000007", "step-000008"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000008"


def test_nonfinite_updates_are_skipped_then_the_run_stops(tiny_model_dir, tmp_path, monkeypatch):
    def absurd_scale(prompts, completions, **_):  # float32 overflows in the loss sum or the gradients
        return [3e38 if i % 2 else -3e38 for i in range(len(completions))]

    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "absurd_scale", absurd_scale)
    cfg = resume_config(tiny_model_dir, tmp_path, "nan", "rewards.functions=[absurd_scale]",
                        "grpo.scale_rewards=none", "train.max_nonfinite_steps=2",
                        "checkpoint.every_n_steps=1")  # fmt: skip
    from graft.training.loop import TrainingError

    with pytest.raises(TrainingError) as err:
        train(cfg)
    text = str(err.value)
    assert "step 2" in text and "not finite" in text and "What is" in text  # names the step and the batch
    rows = metrics(tmp_path / "nan")
    assert [r["nonfinite_skipped"] for r in rows if "loss" in r] == [2, 2]  # both optimizer steps skipped
    # step 1 was checkpointed; the streak that stopped the run at step 2 was not
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == "step-000001"
    weights = load_file(tmp_path / "nan" / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all((v == 0).all() for v in lora_b), "skipped steps must not touch the weights"


SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import build_tiny_model  # noqa: F401  (keeps the test tree importable)
from graft.config import load_config
from graft.training.loop import train
import graft.training.checkpoint as checkpoint

slow_step = {slow_step}
real_save = torch.save

def slow_save(obj, path, *a, **k):  # lets the test kill the process in the middle of one save
    if isinstance(obj, dict) and obj.get("step") == slow_step:
        print("SAVING", flush=True)
        time.sleep(120)
    return real_save(obj, path, *a, **k)

checkpoint.torch.save = slow_save
train(load_config(None, {overrides!r}))
"""


def run_script(tmp_path, overrides, slow_step=-1):
    script = tmp_path / "run.py"
    tests = os.path.dirname(os.path.dirname(__file__))
    script.write_text(textwrap.dedent(SCRIPT.format(tests=tests, slow_step=slow_step, overrides=overrides)))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def cli_overrides(model_dir, out_dir, name, *extra):
    return [
        f"model.name={model_dir}", "task.num_train=12", "task.num_eval=2", "grpo.num_generations=2",
        "generation.max_new_tokens=4", "train.prompts_per_step=2", "checkpoint.every_n_steps=1",
        "eval.at_start=false", f"logging.output_dir={out_dir}", f"logging.run_name={name}",
        "logging.progress=lines", "gate.enabled=false", *extra,
    ]  # fmt: skip


def wait_for(proc, marker, timeout=120):
    lines, end = [], time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"never saw {marker!r}:\n" + "".join(lines))


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(tiny_model_dir, tmp_path):
    overrides = cli_overrides(tiny_model_dir, tmp_path, "killed", "train.max_steps=4")
    proc = run_script(tmp_path, overrides, slow_step=2)
    wait_for(proc, "SAVING")
    proc.kill()
    proc.wait()
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000001"
    assert not (checkpoints / "step-000002").exists()
    assert any(p.name.startswith(".step-000002.tmp") for p in checkpoints.iterdir())  # the torn save
    run = train(load_config(None, [*overrides, "resume=auto"]))
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir()), "torn saves are cleaned up"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_the_step_writes_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path, sig):
    overrides = cli_overrides(tiny_model_dir, tmp_path, "signalled", "train.max_steps=500",
                              "checkpoint.every_n_steps=1000")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "train", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for(proc, "step 1/500")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "resume=auto" in out and "logging.run_name=signalled" in out
    latest = (tmp_path / "signalled" / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert step >= 1
    assert (tmp_path / "signalled" / "checkpoints" / latest / "trainer_state.pt").is_file()
    assert [m["step"] for m in metrics(tmp_path / "signalled") if "loss" in m] == list(range(1, step + 1))


DISK_SCRIPT = """
import resource, signal, sys
import graft.training.loop as loop
from graft.cli import main

real_save = loop.save_checkpoint

def save_then_fill_the_disk(directory, step, **kw):
    if step == 2:  # from the second checkpoint on, files may not grow past 8 KB: writes fail like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    return real_save(directory, step, **kw)

loop.save_checkpoint = save_then_fill_the_disk
sys.exit(main(["train", *{overrides!r}]))
"""


def test_disk_full_on_save_stops_cleanly_and_keeps_earlier_checkpoints(tiny_model_dir, tmp_path):
    overrides = cli_overrides(tiny_model_dir, tmp_path, "full", "train.max_steps=4")
    script = tmp_path / "full.py"
    script.write_text(DISK_SCRIPT.format(overrides=overrides))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not write" in proc.stderr and "Checkpoints written before are intact" in proc.stderr
    checkpoints = tmp_path / "full" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000001"]  # no torn folder left
    run = train(load_config(None, [*overrides, "resume=auto"]))  # and the run goes on from it
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]


def test_a_time_budget_ends_the_run_as_max_steps_would(tiny_model_dir, tmp_path):
    # a budget any step exceeds: step 1 is the last, with the final save, checkpoint and evaluation
    run = train(resume_config(tiny_model_dir, tmp_path, "budget", "train.max_minutes=1e-6"))
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1]
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "eval.json").read_text())["after"]["step"] == 1
    state = torch.load(run / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
    assert state["trainer_state"]["train_seconds"] > 0  # a resumed run spends what is left, not it all again
    # resumed with the same budget: it is spent, so no step runs past it
    again = train(resume_config(tiny_model_dir, tmp_path, "budget", "train.max_minutes=1e-6", "resume=auto"))
    assert [m["step"] for m in metrics(again) if "loss" in m] == [1]
