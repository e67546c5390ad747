"""Bad input is refused before any weights load, every problem at once, each with its fix."""

from pathlib import Path

import pytest

from graft.cli import main
from graft.config import ConfigError, load_config
from graft.validate import check_run, validate_or_raise

RECIPE = Path(__file__).parents[1] / "configs" / "arithmetic.yaml"


def problems(tmp_path, *overrides):
    cfg = load_config(None, [f"logging.output_dir={tmp_path}", *overrides])
    found, _ = check_run(cfg)
    return "\n".join(found)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=/no/such/model"], "model folder '/no/such/model' does not exist"),
        (
            ["model.name=builtin:gpt-9"],
            "unknown built-in 'builtin:gpt-9'; available: builtin:smollm2-135m-instruct",
        ),
        (["model.name=not a model id!"], "is neither a folder, a hub id (org/name) nor builtin:"),
        (["model.device=cuda:0"], "torch sees no CUDA device; use model.device=cpu or auto"),
        (
            ["rewards.functions=[last_integr]"],
            "(did you mean 'last_integer'?)",
        ),
        (["task.max_operand=1", "task.operations=[+]"], "widen the operand range"),
        (["resume=auto"], "resume=auto needs logging.run_name"),
        (["resume=/no/checkpoint"], "is not a complete checkpoint folder"),
        (
            [
                "train.micro_batch_size=4096",
                "train.prompts_per_step=256",
                "grpo.num_generations=16",
                "generation.max_new_tokens=2048",
            ],
            "not enough memory",
        ),  # fmt: skip
    ],
)
def test_each_problem_names_the_key_and_the_fix(tmp_path, overrides, message):
    assert message in problems(tmp_path, *overrides)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "weights").mkdir()
    assert "has no config.json" in problems(tmp_path, f"model.name={tmp_path / 'weights'}")


def test_existing_run_directory_needs_resume(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("{}\n")
    assert "continue it with resume=auto" in problems(tmp_path, "logging.run_name=old")
    assert problems(tmp_path, "logging.run_name=old", "resume=auto") == ""


def test_unwritable_output_directory():
    cfg = load_config(None, ["logging.output_dir=/proc/graft-runs"])
    found, _ = check_run(cfg)
    assert any("cannot write in /proc" in p for p in found)


def test_memory_advice_names_a_micro_batch_that_fits(tmp_path):
    text = problems(
        tmp_path, "train.micro_batch_size=64", "train.prompts_per_step=8", "generation.max_new_tokens=1024"
    )
    assert "the largest part is activations" in text and "would fit" in text


def test_all_problems_are_listed_at_once(tmp_path):
    cfg = load_config(
        None, ["model.name=/nope", "rewards.functions=[x]", "resume=auto", "logging.output_dir=/proc/x"]
    )
    with pytest.raises(ConfigError) as err:
        validate_or_raise(cfg)
    text = str(err.value)
    assert text.startswith("4 problem(s) found before loading the model")
    for part in ("/nope", "reward 'x' is not built in", "resume=auto needs", "cannot write in /proc"):
        assert part in text


def test_default_recipe_is_valid_with_a_sane_estimate(tmp_path):
    found, estimate = check_run(load_config(RECIPE, [f"logging.output_dir={tmp_path}"]))
    assert found == []
    assert 1 < estimate.total / 1024**3 < 8  # SmolLM2-135M with LoRA: a few GiB, measured ~3 GiB peak
    assert estimate.parts["adapter + Adam"] < estimate.parts["weights"]


def test_graft_validate_command(tmp_path, capsys):
    assert main(["validate", "configs/arithmetic.yaml", f"logging.output_dir={tmp_path}"]) == 0
    assert "config OK; memory estimate" in capsys.readouterr().out
    assert main(["validate", "configs/arithmetic.yaml", "model.name=/nope"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_decoder_copy_counts_only_what_outlives_the_rollout(tmp_path):
    """On a CPU the packed sampling copy of a Llama-family model drops its LoRA-adapted layers after each
    rollout, so the estimate counts the head and what no adapter touches, not a second model."""

    def parts(*overrides):
        return check_run(load_config(RECIPE, [f"logging.output_dir={tmp_path}", *overrides]))[1].parts

    packed, full_ft = parts("train.replay=false"), parts("lora.enabled=false")
    # SmolLM2-135M: 135M parameters, 28M of them the tied embedding/head; float32
    assert 28e6 * 4 <= packed["sampling copy"] < 0.5 * packed["weights"]
    assert full_ft["sampling copy"] <= packed["sampling copy"]  # full FT rebuilds every layer
    # train.replay (the recipe's default): the rollout records while the adapted layers are in use, so
    # they count in full, next to a recording smaller than the two-pass activations
    replayed = parts()
    assert replayed["sampling copy"] > packed["sampling copy"]
    assert replayed["activations"] < packed["activations"]
    # the mixed-precision replay (bf16 sampling + bf16 autocast) records in bf16: half the bytes
    mixed = parts("generation.dtype=bfloat16", "train.autocast=bfloat16")
    assert mixed["activations"] == replayed["activations"] // 2


def test_a_decaying_schedule_under_a_time_budget_says_it_follows_max_steps(tmp_path):
    def notes(*overrides):
        cfg = load_config(None, [f"logging.output_dir={tmp_path}", "train.max_minutes=10", *overrides])
        return " ".join(validate_or_raise(cfg).notes)

    assert "decays over train.max_steps=1000 steps, not over train.max_minutes" in notes(
        "train.lr_scheduler=cosine", "train.max_steps=1000"
    )
    assert "train.lr_scheduler" not in notes("train.lr_scheduler=constant")
