"""Tasks read from data: a JSONL file of our own, GSM8K, MATH-style sets, or any hub dataset by name.

Local files and folders load the same way as hub datasets (through `datasets`), so the GSM8K and MATH
loaders are tested offline on fixtures in the hub datasets' schema.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from graft.config import ConfigError, TaskConfig
from graft.tasks.base import Problem, Task, make_task, split_off_eval
from graft.text import last_boxed

DEFAULTS = {  # dataset id, config, prompt column, answer column, correctness reward, system prompt
    "gsm8k": (
        "openai/gsm8k",
        "main",
        "question",
        "answer",
        "gsm8k_flexible",
        "Solve the math word problem. End with the final answer as a number.",
    ),
    "math": (
        "DigitalLearningGmbH/MATH-lighteval",
        None,
        "problem",
        "solution",
        "math_equivalence",
        "Solve the problem. Put the final answer in \\boxed{}.",
    ),
    "hub": (None, None, "prompt", "answer", "gsm8k_flexible", None),
    "jsonl": (None, None, "prompt", "answer", "gsm8k_flexible", None),
}


def row_problem(prompt, answer, prompt_column: str, answer_column: str) -> str | None:
    """Why a row's prompt or gold answer cannot be trained on (None: both usable). A prompt is non-empty
    text; an answer is non-empty text or a number (a reward compares against it, so null or "" would
    score every completion 0 without a word)."""
    if not isinstance(prompt, str):
        kind = "null" if prompt is None else f"{type(prompt).__name__} ({str(prompt)[:40]})"
        return f"'{prompt_column}' is {kind}, not text; give the prompt as a string"
    if not prompt.strip():
        return f"'{prompt_column}' is empty; give the question to ask"
    if not isinstance(answer, str | int | float):  # bool is an int: true/false answers are fine
        kind = "null" if answer is None else type(answer).__name__
        return f"'{answer_column}' is {kind}, not text or a number; give the gold answer the rewards check"
    if isinstance(answer, float) and not math.isfinite(answer):
        return f"'{answer_column}' is {answer}, not a number a reward can check against"
    if isinstance(answer, str) and not answer.strip():
        return f"'{answer_column}' is empty; give the gold answer the rewards check (or drop the line)"
    return None


def kind_label(value) -> tuple[str | None, str | None]:
    """(the label a row's `kind` gives the evaluations' accuracy breakdown, why it cannot be one). Text and
    whole numbers (a MATH-style level 1-5) label; null or no `kind` leaves the row unlabelled."""
    if value is None:
        return None, None
    if isinstance(value, str) and value.strip():
        return value, None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    shown = f"{type(value).__name__} {json.dumps(value)[:40]}"
    return None, (
        f"'kind' is {shown}; it labels the problem for the accuracy breakdown, so give text or a whole "
        "number (or rename the column if only your rewards read it)"
    )


def _bad_rows(problems_found: list[str], where: str) -> ConfigError:
    shown = "\n".join(f"    {p}" for p in problems_found[:10])
    more = f"\n    ... and {len(problems_found) - 10} more" if len(problems_found) > 10 else ""
    return ConfigError(f"{len(problems_found)} bad line(s) in {where}:\n{shown}{more}")


def read_jsonl(path: Path, prompt_column: str, answer_column: str) -> list[Problem]:
    """Our own JSONL: one object per line; every problem names the file and line it came from."""
    if not path.is_file():
        raise ConfigError(f"task.path: '{path}' does not exist or is not a file")
    problems, problems_found = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"task.path: cannot read '{path}': {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems_found.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems_found.append(
                f'{path}:{number}: expected an object like {{"prompt": ..., "answer": ...}}'
            )
            continue
        missing = [c for c in (prompt_column, answer_column) if c not in row]
        if missing:
            problems_found.append(
                f"{path}:{number}: missing {', '.join(repr(m) for m in missing)}; the jsonl task expects "
                f"'{prompt_column}' and '{answer_column}' (set task.prompt_column / task.answer_column)"
            )
            continue
        kind, bad_kind = kind_label(row.get("kind"))
        bad = row_problem(row[prompt_column], row[answer_column], prompt_column, answer_column) or bad_kind
        if bad:
            problems_found.append(f"{path}:{number}: {bad}")
            continue
        extra = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        problems.append(Problem(str(row[prompt_column]), str(row[answer_column]), extra, kind=kind))
    if problems_found:
        raise _bad_rows(problems_found, str(path))
    if not problems:
        raise ConfigError(f"task.path: '{path}' has no examples")
    return problems


def load_rows(cfg: TaskConfig, split: str) -> list[dict]:
    """Rows of one split from a local file/folder (offline) or from the hub."""
    import datasets

    dataset_id, config = cfg.dataset or DEFAULTS[cfg.name][0], cfg.dataset_config or DEFAULTS[cfg.name][1]
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))[split]
        elif path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.stem == split and p.suffix in (".jsonl", ".json", ".parquet")
            )
            if not files:
                raise ConfigError(f"task.path: no {split}.jsonl / {split}.json / {split}.parquet in '{path}'")
            data = _load_file(files[0], datasets)
        elif path.is_file():
            data = _load_file(path, datasets)
        else:
            raise ConfigError(f"task.path: '{path}' does not exist")
    else:
        if not dataset_id:
            raise ConfigError(f"task '{cfg.name}' needs task.dataset (a hub id) or task.path (a local copy)")
        try:
            data = datasets.load_dataset(dataset_id, config, split=split)
        except Exception as exc:  # no network, unknown id, unknown split: say which
            raise ConfigError(f"cannot load {dataset_id} ({split}): {type(exc).__name__}: {exc}") from exc
    return list(data)


def _load_file(path: Path, datasets):
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def gold_answer(task: str, raw) -> str | None:
    text = str(raw)
    if task == "gsm8k":
        return text.split("####")[-1].strip().replace(",", "") if "####" in text else None
    if task == "math":
        return last_boxed(text) if "\\boxed" in text else text.strip()
    return text.strip()


_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


def dataset_task(cfg: TaskConfig) -> Task:
    _, _, prompt_default, answer_default, correctness, system = DEFAULTS[cfg.name]
    prompt_col, answer_col = cfg.prompt_column or prompt_default, cfg.answer_column or answer_default
    if cfg.name == "jsonl":
        if not cfg.path:
            raise ConfigError(
                'the jsonl task needs task.path=<file.jsonl> (one {"prompt", "answer"} per line)'
            )
        train = read_jsonl(Path(cfg.path).expanduser(), prompt_col, answer_col)
        if cfg.eval_path:
            held = read_jsonl(Path(cfg.eval_path).expanduser(), prompt_col, answer_col)
        else:
            train, held = split_off_eval(train, cfg.num_eval, cfg.seed)
        return make_task(cfg, "jsonl", train[: cfg.num_train], held[: cfg.num_eval], system, correctness)

    def problems(split: str) -> list[Problem]:
        rows = load_rows(cfg, split)
        if not rows:
            raise ConfigError(f"task '{cfg.name}': split '{split}' is empty")
        missing = [c for c in (prompt_col, answer_col) if c not in rows[0]]
        if missing:
            raise ConfigError(
                f"task '{cfg.name}': split '{split}' has no column(s) {missing}; it has {sorted(rows[0])}. "
                "Set task.prompt_column / task.answer_column"
            )
        out, bad = [], []
        for number, row in enumerate(rows):
            if not isinstance(row[prompt_col], str) or not row[prompt_col].strip():
                bad.append(f"row {number}: {row_problem(row[prompt_col], '-', prompt_col, answer_col)}")
                continue
            gold = gold_answer(cfg.name, row[answer_col])
            if gold and cfg.name == "gsm8k" and "####" in str(row[answer_col]):
                # the rationale before '####', without the <<48/2=24>> calculator notes: SFT demonstrations
                work = _CALCULATOR_NOTE.sub("", str(row[answer_col]).split("####")[0]).strip()
                rationales.setdefault(str(row[prompt_col]), work)
            if gold:
                extra = {k: v for k, v in row.items() if k not in (prompt_col, answer_col)}
                out.append(Problem(str(row[prompt_col]), gold, extra))
        if bad:
            raise _bad_rows(bad, f"task '{cfg.name}' split '{split}'")
        return out

    rationales: dict[str, str] = {}

    def solve(problem: Problem) -> tuple[str, str, str]:
        work = rationales[problem.prompt]
        return work, problem.answer, f"{work}\n#### {problem.answer}"

    train = problems(cfg.train_split)
    held = problems(cfg.eval_split) if cfg.eval_split else None
    if held is None:
        train, held = split_off_eval(train, cfg.num_eval, cfg.seed)
    strict, solver = ("gsm8k_strict", solve) if cfg.name == "gsm8k" else (None, None)  # lm-eval's '#### n'
    return make_task(
        cfg, cfg.name, train[: cfg.num_train], held[: cfg.num_eval], system, correctness, strict, solver
    )
