"""Every tracker writes output that its own reader reads back, from a real (tiny) training run."""

import json
import sqlite3

import pytest

from graft.cli import main
from graft.config import load_config
from graft.training.loop import train


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", "task.num_train=20", "task.num_eval=2", "grpo.num_generations=2",
        "generation.max_new_tokens=4", "train.max_steps=3", "eval.at_start=false", f"logging.output_dir={out}",
        "logging.run_name=tracked", "logging.progress=lines", "logging.print_config=false", "gate.enabled=false",
        "logging.report_to=[tensorboard, wandb, trackio, mlflow]", "logging.project=graft-test",
        "logging.completions_every=2",
    ])  # fmt: skip
    return train(cfg)


def test_tensorboard_events_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]
    assert "eval/accuracy" in events.Tags()["scalars"]


def test_wandb_offline_run_is_written(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 0


def test_mlflow_store_is_queried_back(tracked_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked_run / "mlruns").absolute().as_uri())
    experiment = client.get_experiment_by_name("graft-test")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.params["grpo.num_generations"] == "2"
    assert mlflow.active_run() is None  # the run was ended


def test_trackio_database_is_queried_back(tracked_run):
    import trackio.utils

    db = trackio.utils.TRACKIO_DIR / "graft-test.db"  # TRACKIO_DIR is fixed when trackio is first imported
    rows = (
        sqlite3.connect(db).execute("select step, metrics from metrics where run_name = 'tracked'").fetchall()
    )
    steps = sorted({step for step, _ in rows})
    assert steps[-3:] == [1, 2, 3] or steps == [1, 2, 3]
    assert any("reward/mean" in json.loads(m) for _, m in rows)


def test_completion_log_has_every_completion(tracked_run, capsys):
    rows = [json.loads(line) for line in (tracked_run / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2  # steps x prompts x generations
    row = rows[0]
    for key in ("step", "prompt", "completion", "answer", "reward", "advantage", "length", "truncated",
                "reward/last_integer"):  # fmt: skip
        assert key in row
    assert {r["step"] for r in rows} == {1, 2, 3}


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    from graft.validate import check_run

    found, _ = check_run(load_config(None, [f"logging.output_dir={tmp_path}", "logging.report_to=[wandb]"]))
    assert any("wandb is not installed; pip install 'graft[tracking]'" in p for p in found)


def test_doctor_reports_versions_and_extras(capsys):
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["packages"]["torch"] and data["devices"]["cpu_cores"] >= 1
    assert data["optional"]["tensorboard"]["version"]
    assert main(["doctor"]) == 0
    assert "graft doctor" in capsys.readouterr().out


def test_completions_are_browsable_by_step_and_reward(tracked_run, capsys):
    assert main(["completions", str(tracked_run), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 completion(s)" in out and "What is" in out
    assert main(["completions", str(tracked_run), "--min-reward", "2"]) == 0  # the reward is 0 or 1
    assert "0 completion(s)" in capsys.readouterr().out
    assert main(["completions", str(tracked_run.parent / "nope")]) == 2


def test_eta_counts_the_budget_a_resumed_run_already_spent(monkeypatch):
    import io

    from rich.console import Console

    from graft import tracking

    now = [1000.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    display = tracking.ProgressDisplay(1000, "lines", Console(file=out, width=400), budget_s=600.0)
    # resumed at step 10 with 500 s of the 600 s budget spent; its first step takes 30 s: 70 s are left
    # (not the 570 s a fresh run would have, nor the 30 s x 989 steps the rate alone says)
    display.start(10, spent_s=500.0)
    now[0] += 30.0
    display.update(11, {})
    assert "[30s elapsed, eta 70s]" in out.getvalue()
