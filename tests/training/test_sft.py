"""SFT warm-up: data, token layout and loss mask, a run on the tiny model, and GRPO starting from it."""

import json

import pytest
import torch

from graft.config import ConfigError, TaskConfig, load_config
from graft.tasks import build_task
from graft.training.sft import collate, encode_example, read_sft_jsonl, run_sft, sft_examples


@pytest.fixture
def task():
    return build_task(TaskConfig(num_train=40, num_eval=6, system_prompt="Be brief."))


def test_jsonl_rows_become_chat_examples_with_the_task_system_prompt(tmp_path, task):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"prompt": "What is 1 + 1?", "completion": "2"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
        + "\n"
    )  # fmt: skip
    examples = read_sft_jsonl(path, task)
    assert examples[0] == (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}],
        "2",
    )
    assert examples[1] == ([{"role": "user", "content": "Hi"}], "Hello")  # messages are taken as given


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "sft.jsonl:1: not valid JSON"),
        ('{"prompt": "q"}', "sft.jsonl:1: expected"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "must end with an assistant message"),
    ],
)
def test_malformed_sft_lines_name_file_and_line(tmp_path, task, line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        read_sft_jsonl(path, task)


def test_missing_file_and_task_without_solutions_are_clear(tmp_path, task):
    with pytest.raises(ConfigError, match="does not exist"):
        read_sft_jsonl(tmp_path / "none.jsonl", task)
    cfg = load_config(None, ["task.name=jsonl", f"sft.data={tmp_path / 'none.jsonl'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        sft_examples(cfg, task)


def test_loss_covers_the_completion_and_stop_token_only(tiny_tokenizer, task):
    example = (task.messages(task.train[0]), "12")
    ids, spans = encode_example(tiny_tokenizer, example, stop_id=2, max_length=512)
    ((n_prompt, end),) = spans
    assert end == len(ids)
    prompt = tiny_tokenizer.apply_chat_template(example[0], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert ids[:n_prompt] == prompt  # exactly what the sampler is given
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == "12" and ids[-1] == 2
    short = encode_example(tiny_tokenizer, (example[0], "7"), stop_id=2, max_length=512)
    batch = collate([(ids, spans), short], pad_id=0)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == batch["input_ids"].shape == mask.shape
    assert (labels[0, :n_prompt] == -100).all() and labels[0, n_prompt:].tolist() == ids[n_prompt:]
    assert mask[1].sum() == len(short[0]) and (labels[1, len(short[0]) :] == -100).all()  # right padding


def test_every_assistant_turn_of_a_multi_turn_example_is_trained_on(tiny_tokenizer):
    # a two-turn conversation: the earlier reply "12" sits inside the prompt, the final reply "7" follows
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "b"},
    ]
    ids, spans = encode_example(tiny_tokenizer, (messages, "7"), stop_id=2, max_length=512)
    assert [tiny_tokenizer.decode(ids[a : b - 1]) for a, b in spans] == ["12", "7"]
    assert all(ids[b - 1] == 2 for _, b in spans)  # each reply ends with the stop token the sampler stops on
    labels = collate([(ids, spans)], pad_id=0)["labels"][0]
    assert (labels != -100).sum() == sum(b - a for a, b in spans)  # the users' turns carry no loss


def sft_config(model_dir, out_dir, *overrides):
    return load_config(None, [
        f"model.name={model_dir}", "task.num_train=40", "task.num_eval=6", "sft.max_steps=30",
        "sft.batch_size=8", "sft.learning_rate=0.03", f"logging.output_dir={out_dir}",
        "logging.progress=lines", "logging.print_config=false", *overrides,
    ])  # fmt: skip


def read_losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_full_sft_learns_the_demonstrations(tiny_model_dir, tmp_path):
    # full fine-tuning: a LoRA on a random 32-wide model learns too slowly to show in a few steps
    cfg = sft_config(tiny_model_dir, tmp_path, "lora.enabled=false")
    final = run_sft(cfg, build_task(cfg.task), tmp_path / "warmup")
    losses = read_losses(tmp_path / "warmup")
    assert len(losses) == 30 and sum(losses[-3:]) < sum(losses[:3]) / 2  # measured 4.3 -> 1.8
    assert (final / "model.safetensors").is_file() and (tmp_path / "warmup" / "config.yaml").is_file()


def test_grpo_starts_from_an_sft_adapter(tiny_model_dir, tmp_path):
    from graft.models import load_model
    from graft.training.loop import train

    cfg = sft_config(tiny_model_dir, tmp_path, "sft.max_steps=4")
    final = run_sft(cfg, build_task(cfg.task), tmp_path / "warmup")
    assert (final / "adapter_config.json").is_file() and len(read_losses(tmp_path / "warmup")) == 4

    base, _ = load_model(cfg.model)
    warm, _ = load_model(cfg.model.model_copy(update={"adapter": str(final)}))
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), warm.parameters(), strict=True))
    assert not hasattr(warm, "peft_config")  # folded in: a fresh adapter goes on top

    run = train(sft_config(tiny_model_dir, tmp_path, f"model.adapter={final}", "train.max_steps=1",
                           "rewards.functions=[format_tags]", "gate.enabled=false", "eval.at_start=false",
                           "logging.run_name=grpo", "grpo.num_generations=2", "train.prompts_per_step=2"))  # fmt: skip
    assert (run / "final" / "adapter_config.json").is_file()
    assert load_config(run / "config.yaml").model.adapter == str(final)


def test_a_missing_adapter_folder_is_a_config_error(tiny_model_dir, tmp_path):
    from graft.validate import validate_or_raise

    with pytest.raises(ConfigError, match="model.adapter.*does not exist"):
        validate_or_raise(sft_config(tiny_model_dir, tmp_path, f"model.adapter={tmp_path}/nope"))
    with pytest.raises(ConfigError, match="drop one of them"):
        validate_or_raise(
            sft_config(tiny_model_dir, tmp_path, f"model.adapter={tmp_path}", "sft.enabled=true")
        )


def test_chained_recipe_checks_the_warmup_data_before_loading(tiny_model_dir, tmp_path):
    from graft.validate import validate_or_raise

    with pytest.raises(ConfigError, match="sft.data: .*does not exist"):
        validate_or_raise(
            sft_config(tiny_model_dir, tmp_path, "sft.enabled=true", f"sft.data={tmp_path}/x.jsonl")
        )
    cfg = sft_config(tiny_model_dir, tmp_path, "sft.enabled=true", "task.name=jsonl",
                     "task.path=configs/data/marbles.jsonl", "task.num_eval=2")  # fmt: skip
    with pytest.raises(ConfigError, match="cannot write worked solutions"):
        validate_or_raise(cfg)
