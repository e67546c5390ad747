"""The Python API (graft.train / evaluate / export / load_run / Run): config keywords validated like
command-line overrides, a Run over a run directory, the same results as the commands, the progress display
in notebooks, and the README's example run exactly as written."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import graft
from graft.api import Run, resolve_config
from graft.cli import main
from graft.config import Config, ConfigError, load_config
from graft.tracking import ProgressDisplay, progress_style

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "configs" / "arithmetic.yaml"


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def tiny_sections(model_dir: Path, out_dir: Path) -> dict:
    """Config sections for a run of seconds on the tiny random model (no downloads)."""
    return {
        "model": {"name": str(model_dir)},
        "task": {"num_train": 20, "num_eval": 4},
        "grpo": {"num_generations": 2},
        "generation": {"max_new_tokens": 4},
        "train": {"max_steps": 2},
        "logging": {
            "output_dir": str(out_dir),
            "run_name": "api",
            "progress": "lines",
            "print_config": False,
        },
        "gate": {"enabled": False},  # a random model: correctness is zero by construction
    }


# ------------------------------------------------------------------------------------------- config


def test_a_mistyped_key_or_section_fails_as_on_the_command_line():
    with pytest.raises(ConfigError) as from_api:
        graft.train(RECIPE, grpo={"betta": 0.1})
    with pytest.raises(ConfigError) as from_overrides:
        load_config(RECIPE, ["grpo.betta=0.1"])
    assert str(from_api.value) == str(from_overrides.value)
    assert "unknown key 'grpo.betta'" in str(from_api.value) and "did you mean 'grpo.beta'?" in str(
        from_api.value
    )

    with pytest.raises(ConfigError, match=r"unknown key 'grpoo'.*did you mean 'grpo'\?"):
        resolve_config(None, grpoo={"beta": 0.1})
    with pytest.raises(ConfigError, match="'grpo' is a section; give it a mapping"):
        resolve_config(None, grpo=0.04)
    with pytest.raises(
        ConfigError, match=r"unknown key 'eval.num_promts' \(did you mean 'eval.num_prompts'\?\)"
    ):
        resolve_config(Config(), eval={"num_promts": 4})
    with pytest.raises(ConfigError, match=r"'train.max_steps': Input should be greater than or equal to 1"):
        resolve_config(Config(), train={"max_steps": 0})
    with pytest.raises(ConfigError, match="config must be a YAML recipe path"):
        resolve_config(3)


def test_sections_merge_over_the_recipe_with_their_types():
    cfg = resolve_config(
        RECIPE,
        train={"learning_rate": 1e-5, "adam_betas": (0.8, 0.9)},
        task={"system_prompt": "line one\nline: 'two' # not a comment", "operations": ["+", "*"]},
        logging={"run_name": "true", "output_dir": Path("out/x")},
        rewards={"functions": None},
        eval={},
    )
    recipe = load_config(RECIPE)
    assert cfg.train.learning_rate == 1e-5 and cfg.train.adam_betas == (0.8, 0.9)
    assert cfg.task.system_prompt == "line one\nline: 'two' # not a comment" and cfg.task.operations == [
        "+",
        "*",
    ]
    assert cfg.logging.run_name == "true" and cfg.logging.output_dir == "out/x"
    assert cfg.train.max_steps == recipe.train.max_steps == 150 and cfg.task.num_eval == 64  # from the file
    assert cfg.eval == recipe.eval

    base = load_config(RECIPE, ["train.max_steps=5"])
    assert resolve_config(base) is base
    merged = resolve_config(base, grpo={"beta": 0.04})
    assert merged == load_config(RECIPE, ["train.max_steps=5", "grpo.beta=0.04"])


# ---------------------------------------------------------------------------------------------- run


def test_a_run_reads_an_existing_directory(tmp_path):
    (tmp_path / "config.yaml").write_text(load_config(RECIPE, ["train.max_steps=2"]).to_yaml())
    records = [
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 1, "reward/mean": 0.5},
        {"step": 2, "reward/mean": 0.75},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = graft.load_run(tmp_path)
    assert run.metrics == records and run.eval == {} and run.accuracy_before is None
    assert run.config.train.max_steps == 2 and run.config.task.num_eval == 64
    (tmp_path / "eval.json").write_text(
        json.dumps({"before": {"accuracy": 0.25}, "after": {"accuracy": 0.5}})
    )
    assert (run.accuracy_before, run.accuracy_after) == (0.25, 0.5)
    assert isinstance(run, graft.Run) and repr(run) == f"Run('{tmp_path}')"

    with pytest.raises(ConfigError, match="is not a graft run directory"):
        Run(tmp_path / "missing")


def test_train_evaluate_and_generate_match_the_commands(tiny_model_dir, tmp_path, capsys):
    run = graft.train(None, **tiny_sections(tiny_model_dir, tmp_path))
    assert run.path == tmp_path / "api" and (run.path / "final").is_dir()
    assert [m["step"] for m in run.metrics] == [0, 1, 2, 2]
    assert run.accuracy_before is not None and run.accuracy_after is not None
    assert run.config.train.max_steps == 2 and run.config.model.name == str(tiny_model_dir)
    capsys.readouterr()

    replies = run.generate(["What is 3 + 4?", "What is 5 - 1?"], max_new_tokens=6)
    assert main(["generate", "--run", str(run.path), "--prompt", "What is 3 + 4?", "--prompt", "What is 5 - 1?",
                 "--max-new-tokens", "6", "--json"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    shown = [json.loads(line)["completion"] for line in printed.splitlines() if line.startswith("{")]
    assert replies == shown and run.generate("What is 3 + 4?", max_new_tokens=6) == replies[:1]

    assert main(["eval", "--run", str(run.path), "--num", "3", "--samples", "2", "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    reused = run.evaluate(num=3, samples=2)  # the model generate loaded
    fresh = graft.evaluate(str(run.path), num=3, samples=2, output=tmp_path / "e.json")
    for data in (reused, fresh, json.loads((tmp_path / "e.json").read_text())):
        assert {k: v for k, v in data.items() if k != "seconds"} == {
            k: v for k, v in from_cli.items() if k != "seconds"
        }
    assert fresh["num_problems"] == 3 and set(fresh["pass_at_k"]) == {"1", "2"}

    out = graft.export(run, tmp_path / "exported", adapter=True)
    assert out == tmp_path / "exported" and (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "merged").exists()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        run.export(out, adapter=True)


# ------------------------------------------------------------------------------------------- module


def test_the_api_names_are_the_api_functions_whatever_was_imported_before():
    """No submodule shares a name with the API (the loop is graft.training, export graft.exporter), so
    importing any of graft's modules first cannot turn graft.train into a module."""
    import graft.exporter  # noqa: F401
    import graft.training.checkpoint  # noqa: F401
    from graft import api

    assert graft.train is api.train and graft.export is api.export and graft.evaluate is api.evaluate
    assert list(inspect.signature(graft.train).parameters)[0] == "config"
    assert {"train", "evaluate", "export", "load_run", "Run"} <= set(dir(graft))
    with pytest.raises(AttributeError):
        graft.no_such_name  # noqa: B018


def test_importing_graft_and_the_command_line_does_not_load_torch():
    code = "import sys, graft, graft.cli; graft.Run, graft.evaluate; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ progress


def test_notebooks_get_the_live_bar_only_where_rich_can_draw_it():
    notebook = Console(force_jupyter=True)
    assert progress_style("auto", notebook, widgets=True) == "bar"
    assert progress_style("auto", notebook, widgets=False) == "lines"  # rich would show only a warning
    assert progress_style("bar", notebook, widgets=False) == "lines"
    assert progress_style("lines", notebook, widgets=True) == "lines"
    terminal = Console(force_jupyter=False)
    assert progress_style("bar", terminal) == "bar" and progress_style("lines", terminal) == "lines"
    assert progress_style("auto", terminal) == ("bar" if sys.stdout.isatty() else "lines")
    assert ProgressDisplay(3, "bar", Console(force_jupyter=False)).use_bar


# ------------------------------------------------------------------------------------------- README


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """From the repository root as the README says, with runs/ and the export landing in a scratch folder."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    run = namespace["run"]
    assert isinstance(run, graft.Run) and run.path.parent == Path("runs")
    assert run.config.grpo.beta == 0.04 and run.config.train.max_steps == 2
    assert run.accuracy_before is not None and run.accuracy_after is not None
    assert (tmp_path / "exported" / "adapter" / "adapter_config.json").is_file()
    printed = capsys.readouterr().out
    assert str(run.path) in printed and "exported" in printed
