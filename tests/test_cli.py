import json

from graft.cli import main


def test_mistyped_key_fails_with_the_closest_key(capsys):
    assert main(["train", "configs/arithmetic.yaml", "grpo.betta=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'grpo.betta'" in err and "did you mean 'grpo.beta'?" in err


def test_config_prints_resolved_yaml_and_key_help(capsys):
    assert main(["config", "configs/arithmetic.yaml", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "name: builtin:smollm2-135m-instruct" in out
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "grpo.beta" in out and "KL coefficient" in out


def test_train_from_the_command_line_shows_progress_and_summary(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "train",  # no recipe: the first argument is already an override
            f"model.name={tiny_model_dir}",
            "task.num_train=20",
            "task.num_eval=4",
            "grpo.num_generations=2",
            "generation.max_new_tokens=4",
            "train.max_steps=2",
            f"logging.output_dir={tmp_path}",
            "logging.run_name=cli",
            "logging.progress=lines",
            "gate.enabled=false",  # a random model: correctness is zero by construction
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "max_steps: 2" in out  # the resolved config is printed at start
    assert "step 1/2" in out and "step 2/2" in out and "eta" in out
    assert "held-out split" in out and "greedy accuracy" in out and "change" in out  # before/after table
    assert (
        f"report: {tmp_path / 'cli' / 'report.html'}" in out and (tmp_path / "cli" / "report.html").is_file()
    )
    lines = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 2]


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main(
        ["train", f"model.name={tmp_path}/missing", f"logging.output_dir={tmp_path}", "eval.at_start=false"]
    )
    assert code == 2
    assert "does not exist; check model.name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "a run that fails to start leaves no run directory"
