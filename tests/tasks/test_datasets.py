"""JSONL, GSM8K, MATH and hub-by-name tasks on local fixtures in the hub datasets' schema (no network)."""

import json

import pytest

from graft.config import ConfigError, TaskConfig
from graft.tasks import build_task
from graft.tasks.datasets import last_boxed


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_task_with_extra_columns_and_held_out_split(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3} for i in range(30)]
    task = build_task(TaskConfig(name="jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)), num_eval=5))
    assert len(task.eval) == 5 and len(task.train) == 25
    assert not {p.prompt for p in task.train} & {p.prompt for p in task.eval}
    prompts, columns = task.reward_inputs(task.train[:2])
    assert set(columns) == {"answer", "level"} and prompts[0][-1]["role"] == "user"
    assert task.default_rewards == ("gsm8k_flexible",)


def test_a_kind_column_labels_problems_for_the_evaluation_breakdown(tmp_path):
    rows = [
        {"prompt": f"What is {i} + 1?", "answer": str(i + 1), "kind": "odd" if i % 2 else "even"}
        for i in range(6)
    ]
    rows.append({"prompt": "What is 9 + 9?", "answer": "18", "kind": 3})  # a level: labels as "3"
    rows.append({"prompt": "What is 8 + 8?", "answer": "16", "kind": None})  # unlabelled
    task = build_task(TaskConfig(name="jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)), num_eval=2))
    kinds = {p.prompt: p.kind for p in task.train + task.eval}
    assert (
        kinds["What is 1 + 1?"] == "odd"
        and kinds["What is 4 + 1?"] == "even"
        and kinds["What is 9 + 9?"] == "3"
        and kinds["What is 8 + 8?"] is None
    )
    assert "kind" in task.reward_inputs(task.train[:1])[1]  # still a column the rewards can read


@pytest.mark.parametrize("kind", [["a"], {"x": 1}, 0.5, True, ""])
def test_a_kind_that_cannot_label_is_a_bad_line_naming_it(tmp_path, kind):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    rows.insert(2, {"prompt": "What is 9 + 9?", "answer": "18", "kind": kind})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: 'kind' is .*give text or a whole number"):
        build_task(TaskConfig(name="jsonl", path=str(path), num_eval=2))


def test_jsonl_eval_file_and_column_mapping(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"q": "a", "a": "1"}, {"q": "b", "a": "2"}])
    held = write_jsonl(tmp_path / "e.jsonl", [{"q": "c", "a": "3"}])
    task = build_task(TaskConfig(name="jsonl", path=str(train), eval_path=str(held), prompt_column="q",
                                 answer_column="a"))  # fmt: skip
    assert [p.answer for p in task.train] == ["1", "2"] and [p.prompt for p in task.eval] == ["c"]


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "answer": "1"}, "{not json", {"prompt": "no answer"}, "[1, 2]", {"prompt": "x", "answer": 2},
    ])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        build_task(TaskConfig(name="jsonl", path=str(path), num_eval=1))
    text = str(err.value)
    assert text.startswith(f"3 bad line(s) in {path}")
    assert f"{path}:2: not valid JSON" in text
    assert f"{path}:3: missing 'answer'; the jsonl task expects 'prompt' and 'answer'" in text
    assert f"{path}:4: expected an object" in text


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.write_text("\n\n"), "has no examples"),
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "cannot read"),
    ],
)
def test_unreadable_or_empty_jsonl_is_refused(tmp_path, setup, message):
    path = tmp_path / "data.jsonl"
    setup(path)
    with pytest.raises(ConfigError, match=message):
        build_task(TaskConfig(name="jsonl", path=str(path)))


def test_jsonl_needs_a_path():
    with pytest.raises(ConfigError, match="needs task.path"):
        build_task(TaskConfig(name="jsonl"))


GSM8K = [
    {
        "question": f"Tom has {i} apples and buys 2 more. How many?",
        "answer": f"{i} + 2 = {i + 2}\n#### {i + 2:,}",
    }
    for i in range(998, 1010)
]


def test_gsm8k_from_a_local_copy_in_the_hub_schema(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K[:10])
    write_jsonl(tmp_path / "test.jsonl", GSM8K[10:])
    task = build_task(TaskConfig(name="gsm8k", path=str(tmp_path), prompt_format="reasoning"))
    assert len(task.train) == 10 and len(task.eval) == 2
    assert task.train[0].answer == "1000"  # after '####', thousands separator dropped
    assert task.default_rewards == ("gsm8k_flexible", "format_tags")
    assert "<reasoning>" in task.system_prompt and "math word problem" in task.system_prompt


def test_gsm8k_from_parquet_and_a_missing_column(tmp_path):
    import datasets

    datasets.Dataset.from_list(GSM8K).to_parquet(str(tmp_path / "train.parquet"))
    task = build_task(
        TaskConfig(name="gsm8k", path=str(tmp_path / "train.parquet"), eval_split=None, num_eval=2)
    )
    assert len(task.train) == 10 and len(task.eval) == 2
    with pytest.raises(ConfigError, match=r"has no column\(s\) \['query'\]"):
        build_task(TaskConfig(name="gsm8k", path=str(tmp_path / "train.parquet"), prompt_column="query",
                              eval_split=None))  # fmt: skip


MATH = [
    {
        "problem": "Simplify 2/4.",
        "solution": "Divide: $\\boxed{\\frac{1}{2}}$.",
        "level": "Level 1",
        "type": "Algebra",
    },
    {"problem": "What is 3!?", "solution": "It is $\\boxed{6}$.", "level": "Level 1", "type": "Counting"},
    {
        "problem": "Nested?",
        "solution": "So $\\boxed{\\sqrt{\\frac{1}{4}}}$.",
        "level": "Level 2",
        "type": "Algebra",
    },
]


def test_math_from_a_saved_dataset_folder(tmp_path):
    import datasets

    data = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(MATH), "test": datasets.Dataset.from_list(MATH[:1])}
    )
    data.save_to_disk(str(tmp_path / "math"))
    task = build_task(TaskConfig(name="math", path=str(tmp_path / "math"), prompt_format="think"))
    assert [p.answer for p in task.train] == ["\\frac{1}{2}", "6", "\\sqrt{\\frac{1}{4}}"]
    assert task.train[0].columns == {"level": "Level 1", "type": "Algebra"}
    assert task.default_rewards == ("math_equivalence", "format_tags")


def test_last_boxed_matches_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None


def test_any_dataset_by_name_with_a_column_mapping(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(20)])
    task = build_task(TaskConfig(name="hub", dataset="someone/some-set", path=str(tmp_path), eval_split=None,
                                 num_eval=4, prompt_column="instruction", answer_column="output"))  # fmt: skip
    assert len(task.train) == 16 and task.train[0].prompt.startswith("Say")


def test_hub_task_without_network_says_what_failed(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot load no-such-org/no-such-dataset"):
        build_task(TaskConfig(name="hub", dataset="no-such-org/no-such-dataset"))
