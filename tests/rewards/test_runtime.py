"""User rewards in worker processes: errors, hangs and NaNs become fallbacks and counts, never a dead run."""

import json
import textwrap

import pytest

from graft.config import ConfigError, load_config
from graft.rewards.runtime import RewardError, RewardRuntime, load_reward
from graft.training.loop import train

REWARDS = """
import asyncio, math, time

def reward_len(completions, **kwargs):  # written for TRL's GRPOTrainer, conversational data
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]

def crashes(prompts, completions, **kwargs):
    raise RuntimeError("my reward is broken")

def hangs(prompts, completions, **kwargs):
    time.sleep(600)

def returns_nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)

def half_none(prompts, completions, answer, **kwargs):
    return [None if i % 2 else 1.0 for i in range(len(completions))]

async def async_reward(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 for _ in completions]

def crash_sometimes(prompts, completions, **kwargs):
    if "7" in str(prompts):
        raise ValueError("no sevens")
    return [0.5] * len(completions)
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARDS))
    return path


def runtime(reward_file, *names, **kw):
    return RewardRuntime([f"{reward_file}:{n}" for n in names], **kw)


PROMPTS = [[{"role": "user", "content": "What is 1 + 1?"}]] * 2
COLUMNS = {"answer": ["2", "2"]}


def test_trl_reward_and_async_reward_run_unchanged(reward_file):
    rt = runtime(reward_file, "reward_len", "async_reward")
    try:
        scores = rt.score(PROMPTS, ["2", "the answer is 2"], COLUMNS)
    finally:
        rt.close()
    assert list(scores.values()) == [[-19.0, -5.0], [1.0, 1.0]]


def test_text_completion_format(reward_file, tmp_path):
    path = tmp_path / "text_reward.py"
    path.write_text("def n_chars(completions, **kw):\n    return [len(c) for c in completions]\n")
    rt = RewardRuntime([f"{path}:n_chars"], completion_format="text")
    try:
        assert rt.score(PROMPTS, ["ab", "abcd"], COLUMNS)[f"{path}:n_chars"] == [2.0, 4.0]
    finally:
        rt.close()


def test_module_spec_and_builtin_spec():
    rt = RewardRuntime(["graft.rewards.builtin:last_integer", "last_integer"], completion_format="text")
    try:
        scores = rt.score(PROMPTS, ["it is 2", "3"], COLUMNS)
    finally:
        rt.close()
    assert list(scores.values()) == [[1.0, 0.0], [1.0, 0.0]]


def test_failures_become_fallbacks_and_are_counted(reward_file):
    rt = runtime(
        reward_file, "crashes", "hangs", "returns_nan", "half_none", timeout=1.0, max_failure_rate=1.0
    )
    try:
        scores = rt.score(PROMPTS, ["a", "b"], COLUMNS)
        again = rt.score(PROMPTS, ["a", "b"], COLUMNS)  # the killed worker was replaced and works again
    finally:
        rt.close()
    values = list(scores.values())
    assert all(v != v for v in values[0] + values[1] + values[2])  # NaN: excluded like None
    assert values[3][0] == 1.0 and values[3][1] != values[3][1]
    assert list(again.values())[3][0] == 1.0
    m = rt.metrics()
    assert (
        m["reward/crashes/errors"] == 2
        and m["reward/hangs/timeouts"] == 2
        and m["reward/returns_nan/nan"] == 4
    )


def test_zero_fallback(reward_file):
    rt = runtime(reward_file, "crashes", on_error="zero", max_failure_rate=1.0)
    try:
        assert list(rt.score(PROMPTS, ["a", "b"], COLUMNS).values()) == [[0.0, 0.0]]
    finally:
        rt.close()


def test_too_many_failures_stop_with_the_traceback_and_the_completion(reward_file):
    rt = runtime(reward_file, "crashes", max_failure_rate=0.5, min_calls=2)
    try:
        rt.score(PROMPTS, ["first", "b"], COLUMNS)
        with pytest.raises(RewardError) as err:
            rt.score(PROMPTS, ["second", "b"], COLUMNS)
    finally:
        rt.close()
    text = str(err.value)
    assert "failed in 2 of 2 calls" in text and "RuntimeError: my reward is broken" in text
    assert "first completion of that batch: 'first'" in text


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope.py:fn", "reward file 'nope.py' does not exist"),
        ("{file}:missing", "has no function 'missing'"),
        ("no_such_package_xyz.mod:fn", "importing no_such_package_xyz.mod failed: ModuleNotFoundError"),
        ("last_integr", "did you mean 'last_integer'?"),
    ],
)
def test_bad_reward_specs(reward_file, spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("?", "\\?")):
        load_reward(spec.format(file=reward_file))


def tiny_run(model_dir, out, name, *overrides):
    cfg = load_config(None, [
        f"model.name={model_dir}", "task.num_train=20", "task.num_eval=2", "grpo.num_generations=2",
        "generation.max_new_tokens=4", "train.max_steps=2", "eval.at_start=false", f"logging.output_dir={out}",
        f"logging.run_name={name}", "logging.progress=lines", "logging.print_config=false", "gate.enabled=false", *overrides,
    ])  # fmt: skip
    run = train(cfg)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_run_survives_raising_hanging_and_nan_rewards(tiny_model_dir, tmp_path, reward_file):
    steps = tiny_run(
        tiny_model_dir, tmp_path, "survives",
        f"rewards.functions=[last_integer, '{reward_file}:crashes', '{reward_file}:hangs', '{reward_file}:returns_nan']",
        "rewards.timeout=1", "rewards.max_failure_rate=1.0",
    )  # fmt: skip
    assert [m["step"] for m in steps] == [1, 2]
    last = steps[-1]
    assert last["reward/crashes/errors"] == 2 and last["reward/hangs/timeouts"] == 2
    assert last["reward/returns_nan/nan"] == 8  # 2 steps x 4 completions
    assert isinstance(last["loss"], float)


def test_a_trl_reward_file_trains_through_the_config(tiny_model_dir, tmp_path, reward_file):
    steps = tiny_run(tiny_model_dir, tmp_path, "trl", f"rewards.functions=['{reward_file}:reward_len']")
    assert all(m["reward/reward_len/mean"] < 0 for m in steps)  # -|20 - length|: the TRL function ran
    assert all(m["reward/reward_len/errors"] == 0 for m in steps)


def test_math_task_trains_with_math_verify_in_workers_for_rewards_and_eval(tiny_model_dir, tmp_path):
    rows = [
        {"problem": f"What is {i} / 2?", "solution": f"It is $\\\\boxed{{\\\\frac{{{i}}}{{2}}}}$."}
        for i in range(20)
    ]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = tiny_run(tiny_model_dir, tmp_path, "math", "task.name=math", f"task.path={data}", "task.eval_split=null",
                     "task.num_eval=4", "eval.at_start=true")  # fmt: skip
    assert [m["step"] for m in steps] == [1, 2]
    assert (
        steps[-1]["reward/math_equivalence/errors"] == 0
        and steps[-1]["reward/math_equivalence/timeouts"] == 0
    )
    evals = json.loads((tmp_path / "math" / "eval.json").read_text())
    assert evals["before"]["num_problems"] == 4


def test_a_reward_file_is_imported_once_by_the_trainer_and_once_per_worker(tiny_model_dir, tmp_path):
    log = tmp_path / "imports.log"
    path = tmp_path / "counted.py"
    path.write_text(
        f"with open({str(log)!r}, 'a') as f:\n    f.write('imported\\n')\n\n"
        "def one(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    tiny_run(
        tiny_model_dir, tmp_path, "counted", f"rewards.functions=['{path}:one']", "rewards.num_workers=1"
    )
    assert (
        log.read_text().count("imported") == 2
    )  # the checks' import is reused by the run, plus the worker's
