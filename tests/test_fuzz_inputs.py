"""Fuzz-style: malformed recipes, data files and reward files made here, each through `graft validate` and
`graft train` (in-process through graft.cli.main, as the console script calls it, and a representative set
in real subprocesses). Each must exit non-zero with one short paragraph and no traceback (or succeed where
the input is legal), and must not leave a run directory that blocks running the same command again."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graft.cli import main


@dataclass
class Case:
    id: str
    args: list[str]  # recipe (if any) and overrides, after the tiny-model base
    validate_ok: bool = False
    train_ok: bool = False
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the case folder first
    recipe: str | bytes | None = None  # YAML recipe text, written as recipe.yaml and passed first


GOOD_ROWS = [{"prompt": f"What is {i} + 2?", "answer": i + 2} for i in range(10)]
LONG_ROWS = [*GOOD_ROWS[:-1], {"prompt": "add " * 80 + "9 + 2?", "answer": "11"}]


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def data(*rows) -> dict[str, str]:
    return {"data.jsonl": jsonl([*GOOD_ROWS, *rows])}


REWARD = "def fn(prompts, completions, answer, **kwargs):\n    {}\n"
JSONL = ["task.name=jsonl", "task.path={dir}/data.jsonl"]
USER_REWARD = [
    "rewards.functions=[last_integer, '{dir}/r.py:fn']",
    "rewards.num_workers=1",
    "rewards.timeout=5",  # the first call includes starting the worker
]


def reward(body: str) -> dict[str, str]:
    return {"r.py": REWARD.format(body)}


CASES = [
    # recipes
    Case("empty-yaml", [], recipe=""),
    Case("comment-yaml", [], recipe="# nothing here\n"),
    Case("not-utf8", [], recipe=b"train:\n  max_steps: 1 # \xff\xfe\n"),
    Case("binary", [], recipe=bytes(range(256))),
    Case("duplicate-key", [], recipe="train:\n  seed: 1\n  seed: 2\n"),
    Case("duplicate-section", [], recipe="grpo: {beta: 0.0}\ngrpo: {beta: 0.1}\n"),
    Case("top-level-list", [], recipe="- train\n- grpo\n"),
    Case("top-level-scalar", [], recipe="42\n"),
    Case("bad-syntax", [], recipe="train: {max_steps: 3\n"),
    Case("tab-indent", [], recipe="train:\n\tmax_steps: 3\n"),
    Case("section-scalar", [], recipe="health: 5\n"),
    Case("unknown-section", [], recipe="trian:\n  max_steps: 3\n"),
    Case("unknown-key", [], recipe="train:\n  max_step: 3\n"),
    Case("wrong-type", [], recipe="grpo:\n  beta: many\n"),
    Case("python-tag", [], recipe="train: !!python/object/apply:os.system ['true']\n"),
    Case("recipe-is-folder", ["{dir}"]),
    Case("recipe-missing", ["{dir}/nope.yaml"]),
    Case("anchors-legal", [], True, True, recipe="train:\n  seed: &s 3\ntask:\n  seed: *s\n"),
    # overrides
    Case("weight-nan", ["rewards.functions=[last_integer]", "rewards.weights=[nan]"]),
    Case("weight-inf", ["rewards.functions=[last_integer]", "rewards.weights=[-.inf]"]),
    Case("weights-count", ["rewards.functions=[last_integer]", "rewards.weights=[1, 2]"]),
    Case("lr-inf", ["train.learning_rate=inf"]),
    Case("lr-negative", ["train.learning_rate=-1"]),
    Case("steps-huge-float", ["train.max_steps=1e999"]),
    Case("betas", ["train.adam_betas=[2, 3]"]),
    Case("group-of-one", ["grpo.num_generations=1"]),
    Case("run-name-escape", ["logging.run_name=../../somewhere"]),
    Case("run-name-slash", ["logging.run_name=a/b"]),
    Case("run-name-empty", ["logging.run_name="]),
    Case("run-name-file", ["logging.output_dir={dir}", "logging.run_name=taken"], files={"taken": "x"}),
    Case("no-room-for-prompt", ["generation.max_new_tokens=1000"]),
    Case("lora-target-typo", ["lora.target_modules=[q_prj]"]),
    Case("lora-target-regex", ["lora.target_modules=(unclosed"]),
    Case("lora-target-empty", ["lora.target_modules=[]"]),
    Case("gate-unknown", ["gate.enabled=true", "gate.rewards=[nope]"]),
    Case("model-missing", ["model.name={dir}/no-model"]),
    Case("model-not-a-model", ["model.name={dir}"], files={"x.txt": "x"}),
    Case("device-bogus", ["model.device=tpu:7"]),
    Case("section-override", ["train=3"]),
    Case("resume-garbage", ["resume={dir}/nothing"]),
    # data files
    Case("answer-null", JSONL, files=data({"prompt": "What is 1 + 1?", "answer": None})),
    Case("answer-empty", JSONL, files=data({"prompt": "What is 1 + 1?", "answer": ""})),
    Case("answer-nan", JSONL, files=data('{"prompt": "What is 1 + 1?", "answer": NaN}')),
    Case("answer-dict", JSONL, files=data({"prompt": "What is 1 + 1?", "answer": {"v": 2}})),
    Case("prompt-empty", JSONL, files=data({"prompt": " ", "answer": "2"})),
    Case("prompt-number", JSONL, files=data({"prompt": 7, "answer": "2"})),
    Case("prompt-list", JSONL, files=data({"prompt": ["a"], "answer": "2"})),
    Case("prompt-null", JSONL, files=data({"prompt": None, "answer": "2"})),
    Case("answer-missing", JSONL, files=data({"prompt": "What is 1 + 1?"})),
    Case("not-json", JSONL, files=data("{prompt: 1}")),
    Case("json-array", JSONL, files=data("[1, 2]")),
    Case("data-empty", JSONL, files={"data.jsonl": ""}),
    Case("data-blank-lines", JSONL, files={"data.jsonl": "\n\n\n"}),
    Case("data-not-utf8", JSONL, files={"data.jsonl": b'{"prompt": "\xff", "answer": "1"}\n'}),
    Case("data-is-folder", ["task.name=jsonl", "task.path={dir}"]),
    Case("data-too-few", [*JSONL, "task.num_eval=5"], files={"data.jsonl": jsonl(GOOD_ROWS[:3])}),
    Case("prompt-too-long", JSONL, files={"data.jsonl": jsonl(LONG_ROWS)}),
    Case(
        "long-drop-legal",
        [*JSONL, "task.long_prompts=drop"],
        True,
        True,
        files={"data.jsonl": jsonl(LONG_ROWS)},
    ),
    Case(
        "long-truncate-legal",
        [*JSONL, "task.long_prompts=truncate"],
        True,
        True,
        files={"data.jsonl": jsonl(LONG_ROWS)},
    ),  # fmt: skip
    # reward files
    Case("reward-syntax", USER_REWARD, files={"r.py": "def fn(:\n"}),
    Case("reward-import-error", USER_REWARD, files={"r.py": "import no_such_module_xyz\n"}),
    Case("reward-raises-at-import", USER_REWARD, files={"r.py": "raise SystemExit(3)\n"}),
    Case("reward-missing-fn", USER_REWARD, files={"r.py": "def other(**kw):\n    return []\n"}),
    Case("reward-not-callable", USER_REWARD, files={"r.py": "fn = 3\n"}),
    Case("reward-bad-signature", USER_REWARD, files={"r.py": "def fn(x):\n    return [0.0]\n"}),
    Case("reward-not-py", ["rewards.functions=['{dir}/r.txt:fn']"], files={"r.txt": "x"}),
    Case("reward-always-raises", USER_REWARD, True, False, files=reward("raise KeyError('nope')")),
    Case("reward-nan", USER_REWARD, True, False, files=reward("return [float('nan')] * len(completions)")),
    Case("reward-wrong-length", USER_REWARD, True, False, files=reward("return [1.0]")),
    Case("reward-strings", USER_REWARD, True, False, files=reward("return ['high'] * len(completions)")),
    Case(
        "reward-hangs",
        [*USER_REWARD, "rewards.timeout=1"],
        True,
        False,
        files=reward("import time; time.sleep(60)"),
    ),
    Case("reward-exits", USER_REWARD, True, False, files=reward("import os; os._exit(1)")),
    # legal inputs
    Case("defaults-legal", [], True, True),
    Case(
        "jsonl-and-reward-legal",
        [*JSONL, *USER_REWARD],
        True,
        True,
        files={**data(), **reward("return [float(len(c)) for c in completions]")},
    ),  # fmt: skip
]


def base(model_dir: Path, out: Path, name: str) -> list[str]:
    """Small and fast; given after a recipe, so the recipe cases break sections these do not set."""
    return [
        f"model.name={model_dir}", "task.num_train=8", "task.num_eval=2", "grpo.num_generations=2",
        "generation.max_new_tokens=4", "train.max_steps=1", "train.micro_batch_size=4", "eval.at_start=false",
        "eval.num_prompts=2", "gate.enabled=false", f"logging.output_dir={out}", f"logging.run_name={name}",
        "logging.progress=lines", "logging.print_config=false", "logging.completions_every=0",
    ]  # fmt: skip


def materialize(case: Case, model_dir: Path, root: Path) -> list[str]:
    """The case's files on disk; the argument list for `graft <command>`."""
    folder = root / case.id
    folder.mkdir()
    for name, content in case.files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [a.replace("{dir}", str(folder)) for a in case.args]
    head = []
    if case.recipe is not None:
        recipe = folder / "recipe.yaml"
        recipe.write_bytes(case.recipe if isinstance(case.recipe, bytes) else case.recipe.encode())
        head = [str(recipe)]
    elif args and "=" not in args[0]:  # a recipe path given as the case's first argument
        head, args = args[:1], args[1:]
    return [*head, *base(model_dir, root / "runs", case.id), *args]


def verdict(case: Case, command: str, ok: bool, code: int, out: str, err: str) -> str | None:
    """What is wrong with one command's outcome (None: as required)."""
    text = out + err
    if "Traceback" in text:
        return f"{case.id} {command}: a traceback:\n{text[-1500:]}"
    if ok and code != 0:
        return f"{case.id} {command}: exit {code} for a legal input:\n{err[-1500:]}"
    if not ok:
        message = err.strip()
        if code == 0:
            return f"{case.id} {command}: exit 0 for a bad input"
        if not message or "\n\n" in message or len(message) > 2500:
            return f"{case.id} {command}: not one short paragraph ({len(message)} chars):\n{message[:2500]}"
    return None


def test_malformed_inputs_fail_with_one_message_in_process(tiny_model_dir, tmp_path, capsys):
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    wrong = []
    for case in CASES:
        args = materialize(case, tiny_model_dir, tmp_path)
        for command, ok in (("validate", case.validate_ok), ("train", case.train_ok)):
            code = main([command, *args])
            captured = capsys.readouterr()
            wrong.append(verdict(case, command, ok, code, captured.out, captured.err))
        if not case.train_ok:  # the same command again is not blocked by what the failed one left
            main(["validate", *args])
            err = capsys.readouterr().err
            if "already exists" in err:
                wrong.append(f"{case.id}: a failed train left a run directory that blocks a rerun: {err}")
    wrong = [w for w in wrong if w]
    assert not wrong, f"{len(wrong)} case(s) wrong:\n\n" + "\n\n".join(wrong)


SUBPROCESS = ["not-utf8", "duplicate-key", "run-name-escape", "answer-null", "prompt-too-long",
              "reward-raises-at-import", "reward-nan", "defaults-legal"]  # fmt: skip


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_in_a_real_process(tiny_model_dir, tmp_path, case_id):
    """`graft train` as a user runs it: the console script's entry point in a fresh interpreter."""
    case = next(c for c in CASES if c.id == case_id)
    args = materialize(case, tiny_model_dir, tmp_path)
    cmd = [sys.executable, "-c", "import sys; from graft.cli import main; sys.exit(main())", "train", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    problem = verdict(case, "train", case.train_ok, done.returncode, done.stdout, done.stderr)
    assert problem is None, problem
