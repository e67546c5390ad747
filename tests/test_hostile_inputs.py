"""A careless or hostile user's inputs (issue: "Hardening from a hostile new user's afternoon"): each one is
refused before loading with the key, row or file and the fix, or handled without losing records."""

import json
import math
import os
import shutil
import signal
import time

import pytest

from graft.cli import main
from graft.config import ConfigError, load_config
from graft.rewards import builtin
from graft.rewards.runtime import RewardError, RewardRuntime
from graft.training.loop import train
from graft.training.run import RunDir, RunDirError, StepAborted, StopRequest
from graft.validate import check_run, validate_or_raise


def tiny(model_dir, out, *overrides):
    return [
        f"model.name={model_dir}", "task.num_train=12", "task.num_eval=2", "grpo.num_generations=2",
        "generation.max_new_tokens=4", "train.max_steps=1", "train.micro_batch_size=4", "eval.at_start=false",
        "eval.every_n_steps=0", "gate.enabled=false", f"logging.output_dir={out}", "logging.progress=lines",
        "logging.print_config=false", "logging.completions_every=0", *overrides,
    ]  # fmt: skip


def problems(*overrides) -> str:
    return "\n".join(check_run(load_config(None, list(overrides)))[0])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows(n=8):
    return [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]


# ------------------------------------------------------------------ 1. prompts longer than the context


def test_prompts_longer_than_the_context_are_named_before_loading(tiny_model_dir, tmp_path):
    data = rows()
    data[3]["prompt"] = "add " * 100 + "1 + 1?"  # 406 characters; the tiny model has 256 positions
    path = write_jsonl(tmp_path / "long.jsonl", data)
    base = tiny(tiny_model_dir, tmp_path / "runs", "task.name=jsonl", f"task.path={path}")
    text = problems(*base)
    assert f"{path}:4 (" in text and "256 positions - 4 new tokens = 252" in text
    assert "task.long_prompts=truncate" in text

    dropped = validate_or_raise(load_config(None, [*base, "task.long_prompts=drop"]))
    assert not [p for p in dropped.task.train + dropped.task.eval if "add add" in p.prompt]
    assert "task.long_prompts=drop" in dropped.notes[0] and "dropped" in dropped.notes[0]

    from graft.checks.prompts import prompt_length
    from graft.models import load_tokenizer

    cut = validate_or_raise(load_config(None, [*base, "task.long_prompts=truncate"]))
    long = [p for p in cut.task.train + cut.task.eval if "add add" in p.prompt]
    tokenizer = load_tokenizer(str(tiny_model_dir), load_config(None, base).model)
    assert long and long[0].prompt.endswith("1 + 1?")  # the end is kept, as TRL truncates
    assert prompt_length(tokenizer, cut.task, long[0]) <= 252


def test_memory_estimate_counts_the_real_prompt_lengths(tiny_model_dir, tmp_path):
    def kv(prompt):
        path = write_jsonl(
            tmp_path / f"{len(prompt)}.jsonl", [{**r, "prompt": prompt + r["prompt"]} for r in rows()]
        )
        cfg = load_config(None, tiny(tiny_model_dir, tmp_path, "task.name=jsonl", f"task.path={path}"))
        found, estimate = check_run(cfg)
        assert found == []
        return estimate.parts["rollout KV + logits"]

    assert kv("a " * 100) > kv("")


def test_max_new_tokens_that_leave_no_room_for_a_prompt(tiny_model_dir, tmp_path):
    text = problems(*tiny(tiny_model_dir, tmp_path, "generation.max_new_tokens=300"))
    assert "'generation.max_new_tokens'" in text and "leave no room for a prompt" in text


def test_a_second_sigterm_aborts_the_step():
    with StopRequest(timeout=None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(StepAborted, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)


def test_a_step_that_outlives_the_stop_timeout_is_aborted():
    with StopRequest(timeout=0.2) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(StepAborted, match="train.stop_timeout=0.2"):
            time.sleep(3)
    with StopRequest(timeout=0.2) as stop:  # a step that ends in time: the checkpoint is not cut short
        os.kill(os.getpid(), signal.SIGTERM)
        stop.step_done()
        time.sleep(0.4)
        assert stop.requested


# ------------------------------------------------------------------ 2. null or empty answers (and bad prompts)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "What is 1 + 1?", "answer": None}, "'answer' is null"),
        ({"prompt": "What is 1 + 1?", "answer": "  "}, "'answer' is empty"),
        ({"prompt": "What is 1 + 1?", "answer": [2]}, "'answer' is list"),
        ({"prompt": "", "answer": "2"}, "'prompt' is empty"),
        ({"prompt": 12, "answer": "2"}, "'prompt' is int"),
        ({"prompt": ["a", "b"], "answer": "2"}, "'prompt' is list"),
    ],
)
def test_unusable_rows_are_refused_by_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(), row])
    text = problems("task.name=jsonl", f"task.path={path}", f"logging.output_dir={tmp_path}")
    assert f"{path}:9: {message}" in text


# ------------------------------------------------------------------ 3. non-finite weights and numbers


@pytest.mark.parametrize(
    "override", ["rewards.weights=[nan]", "rewards.weights=[.inf]", "train.learning_rate=inf"]
)
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, ["rewards.functions=[last_integer]", override])


# ------------------------------------------------------------------ 4. NaN rewards count as failures


def nan_reward(prompts, completions, **_):
    return [math.nan] * len(completions)


def failing_reward(prompts, completions, **_):
    raise ValueError("boom in my reward")


@pytest.fixture
def bad_rewards(monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "nan_reward", nan_reward)
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "failing_reward", failing_reward)


def test_a_nan_reward_is_stopped_by_max_failure_rate(bad_rewards):
    rt = RewardRuntime(["nan_reward", "last_integer"], max_failure_rate=0.5, min_calls=2)
    rt.score([[]] * 4, ["1"] * 4, {"answer": ["1"] * 4})
    assert rt.new_failures()[0][0] == "nan_reward" and rt.new_failures() == []  # reported once
    with pytest.raises(RewardError) as err:
        rt.score([[]] * 4, ["1"] * 4, {"answer": ["1"] * 4})
    assert "reward 'nan_reward' returned NaN/inf for 8 of 8 completions: 100% of its scores" in str(err.value)
    assert "rewards.max_failure_rate=0.5" in str(err.value)


def test_a_short_run_with_a_broken_reward_fails_and_says_so(bad_rewards, tiny_model_dir, tmp_path, capsys):
    args = tiny(
        tiny_model_dir, tmp_path, "rewards.functions=[failing_reward, last_integer]", "logging.run_name=r"
    )
    with pytest.raises(RewardError, match="failed in 1 of 1 calls"):
        train(load_config(None, args))
    out = capsys.readouterr().out
    assert "reward 'failing_reward' failed" in out and "ValueError: boom in my reward" in out
    assert "Traceback" not in out
    # the run stopped before its first checkpoint: the same command may start it again
    run, _ = RunDir.for_config(load_config(None, args))
    assert "starting over" in run.notes[0]


def test_the_mean_reward_shows_n_a_when_every_value_was_excluded():
    from graft.tracking import summary_line

    assert summary_line({"reward/mean": math.nan, "accuracy": 0.5}) == "reward n/a  acc 0.5"


# ------------------------------------------------------------------ 5. resume with a changed config


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 and final/ (copied by each test)."""
    out = tmp_path_factory.mktemp("trained")
    args = tiny(
        tiny_model_dir, out, "train.max_steps=2", "checkpoint.every_n_steps=1", "logging.run_name=run"
    )
    return train(load_config(None, args)), args


def copy_run(trained_run, tmp_path):
    run, args = trained_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", [a for a in args if not a.startswith("logging.output_dir")] + [
        f"logging.output_dir={tmp_path}"
    ]


@pytest.mark.parametrize(
    "change, key",
    [
        ("lora.r=8", "lora.r: 16 -> 8"),
        ("task.system_prompt='Be brief.'", "task.system_prompt: 'default' -> 'Be brief.'"),
        ("task.max_operand=99", "task.max_operand: 20 -> 99"),
    ],
)
def test_resume_refuses_changes_that_cannot_continue_before_writing(trained_run, tmp_path, change, key):
    run, args = copy_run(trained_run, tmp_path)
    saved = (run / "config.yaml").read_text()
    assert main(["validate", *args, "resume=auto", change]) == 2
    with pytest.raises(ConfigError) as err:
        train(load_config(None, [*args, "resume=auto", change]))
    assert key in str(err.value) and "another logging.run_name" in str(err.value)
    assert (run / "config.yaml").read_text() == saved and not list(run.glob("config.from-*"))


def test_resume_records_changes_it_can_make_and_keeps_every_config(trained_run, tmp_path, capsys):
    run, args = copy_run(trained_run, tmp_path)
    saved = (run / "config.yaml").read_text()
    train(load_config(None, [*args, "resume=auto", "train.max_steps=3", "train.learning_rate=0.066"]))
    out = capsys.readouterr().out
    assert "resuming with changed settings" in out and "train.learning_rate: 0.0002 -> 0.066" in out
    assert (run / "config.yaml").read_text() == saved
    later = load_config(run / "config.from-step-000003.yaml")
    assert later.train.learning_rate == 0.066 and later.train.max_steps == 3


# ------------------------------------------------------------------ damaged checkpoints and adapters


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.pt"])
def test_resume_auto_passes_over_a_damaged_checkpoint_and_names_it(trained_run, tmp_path, damaged):
    run, args = copy_run(trained_run, tmp_path)
    truncate(run / "checkpoints" / "step-000002" / damaged)
    checked = validate_or_raise(load_config(None, [*args, "resume=auto", "train.max_steps=3"]))
    notes = " ".join(checked.notes)
    assert f"step-000002/{damaged} is truncated" in notes and "resuming from step-000001" in notes
    with pytest.raises(ConfigError, match=f"step-000002/{damaged} is truncated.*resume=.*step-000001"):
        validate_or_raise(load_config(None, [*args, f"resume={run / 'checkpoints' / 'step-000002'}"]))
    truncate(run / "checkpoints" / "step-000001" / damaged)
    with pytest.raises(RunDirError, match="no checkpoint of .* can be resumed from"):
        RunDir.for_config(load_config(None, [*args, "resume=auto"]))


def test_a_truncated_final_adapter_names_the_file_and_a_checkpoint(trained_run, tmp_path, capsys):
    run, _ = copy_run(trained_run, tmp_path)
    truncate(run / "final" / "adapter_model.safetensors")
    assert main(["generate", "--run", str(run), "--prompt", "1 + 1"]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors is truncated" in err and "--checkpoint step-000002" in err
    assert "Traceback" not in err


def test_a_truncated_model_file_is_found_before_loading(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    truncate(model / "model.safetensors", 5000)
    assert "model.safetensors is truncated" in problems(*tiny(model, tmp_path / "runs"))


# ------------------------------------------------------------------ 6. report, 7. run names


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.html").write_text("my own page")
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["report", str(tmp_path / "mine")]) == 2
    assert "not a graft run directory" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []
    assert (tmp_path / "mine" / "report.html").read_text() == "my own page"


@pytest.mark.parametrize("name", ["../../somewhere", "a/b", "..", "a\tb", "a\\b"])
def test_run_names_are_names_not_paths(name):
    with pytest.raises(ConfigError, match="'logging.run_name'"):
        load_config(None, [f"logging.run_name={name}"])


def test_a_run_name_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    assert "is a file, not a run directory" in problems(
        f"logging.output_dir={tmp_path}", "logging.run_name=taken"
    )


# ------------------------------------------------------------------ tracebacks where a message belongs


def test_a_recipe_that_is_not_utf8(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"train:\n  max_steps: 3 # caf\xe9\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text (byte 0xe9 on line 2)" in err and "Traceback" not in err


def test_unknown_lora_target_module_is_found_by_validate(tiny_model_dir, tmp_path):
    text = problems(*tiny(tiny_model_dir, tmp_path, "lora.target_modules=[q_prj, v_proj]"))
    assert "no layer named 'q_prj' (did you mean 'q_proj'?)" in text


def test_unexpected_errors_are_one_message_and_debug_shows_the_traceback(monkeypatch, capsys):
    import graft.cli

    def broken(args, console):
        raise ZeroDivisionError("division by zero somewhere deep")

    monkeypatch.setattr(graft.cli, "cmd_config", broken)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError: division by zero somewhere deep" in err and "--debug" in err
    assert "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["config", "--debug"])


# ------------------------------------------------------------------ said OK, failed later, accepted silently


def test_unknown_gate_reward_is_found_by_validate(tmp_path):
    text = problems(f"logging.output_dir={tmp_path}", "gate.rewards=[last_integr]")
    assert (
        "'gate.rewards': 'last_integr' is not a reward this run computes (did you mean 'last_integer'?)"
        in text
    )


def test_a_reward_whose_signature_cannot_take_the_arguments(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def strict(completions, solution):\n    return [0.0] * len(completions)\n")
    text = problems(f"logging.output_dir={tmp_path}", f"rewards.functions=['{path}:strict']")
    assert f"reward '{path}:strict' cannot take the arguments" in text and "**kwargs" in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty (no keys)"),
        ("# only a comment\n", "is empty (no keys)"),
        ("train:\n  max_steps: 3\n  max_steps: 30\n", "found duplicate key 'max_steps' (first at line 2)"),
        ("train: {max_steps: 3}\ntrain: {seed: 1}\n", "found duplicate key 'train'"),
    ],
)
def test_empty_recipes_and_duplicate_keys_are_refused(tmp_path, content, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(recipe)


def test_a_folder_given_as_the_recipe(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


@pytest.mark.parametrize("args", [["--samples", "-3"], ["--num", "0"], ["--max-new-tokens", "-1"]])
def test_eval_refuses_negative_counts(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *args])
    assert exit_.value.code == 2 and "is below" in capsys.readouterr().err
