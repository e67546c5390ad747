from pathlib import Path

import pytest

from graft.config import Config, ConfigError, describe, load_config, parse_override


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_recipe_plus_overrides_with_yaml_typing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("grpo:\n  beta: 0.1\ntrain:\n  max_steps: 50\n")
    cfg = load_config(recipe, ["grpo.beta=0.04", "train.max_steps=3", "lora.enabled=false",
                               "task.operations=[+, '*']", "train.max_grad_norm=null"])  # fmt: skip
    assert cfg.grpo.beta == 0.04 and cfg.train.max_steps == 3
    assert cfg.lora.enabled is False
    assert cfg.task.operations == ["+", "*"]
    assert cfg.train.max_grad_norm is None


def test_shipped_recipe_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "arithmetic.yaml")
    assert cfg.model.name == "builtin:smollm2-135m-instruct"


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.betta=0.1", "unknown key 'grpo.betta' (did you mean 'grpo.beta'?)"),
        ("train.beta=0.1", "unknown key 'train.beta' (did you mean 'grpo.beta'?)"),
        ("beta=0.1", "did you mean 'grpo.beta'?"),
        ("lora.rank=8", "did you mean 'lora.r'?"),
        ("train.max_step=3", "did you mean 'train.max_steps'?"),
        ("grpo=3", "'grpo' is a section"),
        ("grpo.num_generations=1", "'grpo.num_generations': Input should be greater than or equal to 2"),
        ("generation.temperature=hot", "'generation.temperature': Input should be a valid number"),
        ("grpo.loss_type=mean", "'grpo.loss_type': Input should be 'grpo', 'bnpo', 'dr_grpo' or 'dapo'"),
        ("task.min_operand=50", "min_operand (50) is larger than max_operand (20)"),
        ("grpo.num_minibatches=3", "does not split into grpo.num_minibatches=3"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["grpo.betta=1", "lora.rnk=2", "train.epochs=3"])
    text = str(err.value)
    assert text.startswith("3 config problem(s)")
    assert "grpo.betta" in text and "lora.rnk" in text and "train.epochs" in text


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="has no '='"):
        parse_override("grpo.beta")


def test_every_field_has_a_default_and_help():
    rows = describe()
    assert len(rows) > 40
    for key, _default, help_text in rows:
        assert help_text, f"{key} has no help"
    assert Config().model_dump()  # every field has a default: building with no arguments works


def test_reward_weights_must_match_the_functions():
    with pytest.raises(ConfigError, match="weights has 2 entries but functions has 1"):
        load_config(None, ["rewards.functions=[last_integer]", "rewards.weights=[1, 2]"])


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_recipe_is_valid_and_says_how_to_run_it(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith(f"# graft train configs/{recipe.name}")
    cfg = load_config(recipe)
    if cfg.task.name in ("arithmetic", "countdown", "jsonl"):  # the others download their data
        import os

        from graft.tasks import build_task

        cwd = os.getcwd()
        os.chdir(Path(__file__).parents[1])
        try:
            assert build_task(cfg.task).train
        finally:
            os.chdir(cwd)


def test_w_reinforce_and_dynamic_sampling_are_refused_together():
    with pytest.raises(ConfigError, match="use one of the two"):
        load_config(None, ["grpo.advantage=w_reinforce", "grpo.dynamic_sampling=true"])
    assert load_config(None, ["grpo.advantage=w_reinforce"]).grpo.positive_weight == 0.1


def test_an_entropy_weight_starting_above_its_maximum_names_both_keys():
    with pytest.raises(ConfigError, match="raise entropy_coef_max or lower entropy_coef"):
        load_config(None, ["grpo.entropy_target=0.3", "grpo.entropy_coef=0.5"])
    fixed = load_config(None, ["grpo.entropy_coef=0.5"]).grpo  # no target: a fixed weight, no maximum
    assert fixed.entropy_coef == 0.5 and fixed.entropy_target is None


def test_a_weight_average_needs_a_decay_below_one_and_unsharded_weights():
    assert load_config(None, ["train.ema_decay=0.9"]).train.ema_decay == 0.9
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["train.ema_decay=1"])  # an average that never moves
    with pytest.raises(ConfigError, match="set train.ema_decay=null or train.fsdp=false"):
        load_config(None, ["train.ema_decay=0.9", "train.fsdp=true"])
