"""A single self-contained HTML page summarising one run directory (`graft report RUN_DIR`).

Everything is read from files the run already wrote, so a report can be made for a crashed, interrupted or
still-running run; whatever is missing is named on the page instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

# (label, key in an eval result, decimals): rates get 3 decimals like the console summary, lengths 1
_SCALAR_ROWS = [
    ("greedy accuracy", "accuracy", 3),
    ("greedy accuracy, unseen phrasing", "unseen_accuracy", 3),
    ("strict accuracy", "accuracy_strict", 3),
    ("format compliance", "format_compliance", 3),
]
_TAIL_ROWS = [
    ("mean length", "mean_length", 1),
    ("p95 length", "p95_length", 1),
    ("truncation", "truncated_fraction", 3),
]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}pre{white-space:pre-wrap;margin:0;max-width:420px}
.note{color:#8a5a00}img{max-width:100%;display:block;margin:1em 0}"""


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file, one per step, sorted by step. Unparseable lines are skipped: the last line is
    torn when a run is killed mid-write."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        step = row["step"]
        # A resumed run re-does steps, so a later full row replaces the earlier one; but the final held-out
        # eval is logged as its own {"step": max_steps, "eval/accuracy": ...} row, which must not wipe
        # that step's training metrics, so eval-only rows are merged in instead.
        if step in by_step and all(k == "step" or k.startswith("eval/") for k in row):
            by_step[step].update(row)
        else:
            by_step[step] = row
    return [by_step[s] for s in sorted(by_step)]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _change(before: float | None, after: float | None, decimals: int) -> str:
    if before is None or after is None:
        return "-"
    text = f"{after - before:+.{decimals}f}"
    return "+" + text[1:] if float(text) == 0 else text  # no "-0.000" for a change that rounds to nothing


def summary_rows(eval_history: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) as display strings; "-" where a side was not evaluated. Rows absent
    from both sides are left out, so older eval.json files without the newer metrics give a shorter table."""
    before, after = eval_history.get("before") or {}, eval_history.get("after") or {}
    specs: list[tuple[str, float | None, float | None, int]] = []
    for label, key, decimals in _SCALAR_ROWS:
        specs.append((label, _number(before.get(key)), _number(after.get(key)), decimals))
    b, a = before.get("accuracy_by_kind") or {}, after.get("accuracy_by_kind") or {}
    for kind in sorted(set(b) | set(a)):  # the task's own breakdown (arithmetic: operation and sign)
        specs.append((f"greedy accuracy, {kind}", _number(b.get(kind)), _number(a.get(kind)), 3))
    for family in ("pass_at_k", "maj_at_k"):
        b, a = before.get(family) or {}, after.get(family) or {}
        for k in sorted(set(b) | set(a), key=lambda k: (len(str(k)), str(k))):  # "2" before "16"
            specs.append((f"{family.split('_')[0]}@{k}", _number(b.get(k)), _number(a.get(k)), 3))
    b, a = before.get("episode") or {}, after.get("episode") or {}
    for key in sorted(set(b) | set(a)):  # multi-turn tasks: the environment's own measures
        specs.append((key.replace("_", " "), _number(b.get(key)), _number(a.get(key)), 3))
    for label, key, decimals in _TAIL_ROWS:
        specs.append((label, _number(before.get(key)), _number(after.get(key)), decimals))
    return [
        (label, _fmt(b, d), _fmt(a, d), _change(b, a, d))
        for label, b, a, d in specs
        if b is not None or a is not None
    ]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], _number(r.get(key))) for r in rows]
    points = [(s, v) for s, v in points if v is not None and not math.isnan(v)]
    return [s for s, _ in points], [v for _, v in points]


def _rolling(values: list[float], window: int) -> list[float]:
    chunks = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [sum(c) / len(c) for c in chunks]


def _plots(rows: list[dict], eval_history: dict, sft_rows: list[dict]) -> list[tuple[str, str]]:
    """(title, PNG data URI) per plot that has data. Figures are built with the object API rather than pyplot:
    they render through Agg without switching the process-wide backend (which would close a notebook's open
    figures) and are freed with their last reference instead of piling up in pyplot's registry."""
    from matplotlib.figure import Figure

    plots: list[tuple[str, str]] = []

    def add(
        title: str, lines: list[tuple[str, list[int], list[float], dict]], ylabel: str, twin=None
    ) -> None:
        if not any(xs for _, xs, _, _ in lines):
            return  # no empty axes: the page says instead what was not logged
        fig = Figure(figsize=(8, 3.2), layout="constrained")
        ax = fig.add_subplot()
        for label, xs, ys, style in lines:
            if xs:
                ax.plot(xs, ys, label=label, **style)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()
        if twin and twin[1]:
            ax2 = ax.twinx()
            ax2.plot(twin[1], twin[2], "--", color="tab:red", label=twin[0])
            ax2.set_ylabel(twin[0])
            handles = tuple(a + b for a, b in zip(handles, ax2.get_legend_handles_labels(), strict=True))
        ax.legend(*handles, fontsize="small", loc="best")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plots.append((title, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")))

    xs, ys = _series(rows, "reward/mean")
    window = max(1, min(20, len(ys) // 5))
    add(
        "Reward",
        [
            ("reward mean", xs, ys, {"alpha": 0.35}),
            (f"rolling mean ({window} steps)", xs, _rolling(ys, window), {}),
            ("train accuracy", *_series(rows, "accuracy"), {"alpha": 0.6}),
        ],
        "reward / accuracy",
    )
    held_out = dict(zip(*_series(rows, "eval/accuracy"), strict=True))
    for result in eval_history.values():  # eval.json is the fuller record, so it wins on a shared step
        if isinstance(result.get("step"), int) and _number(result.get("accuracy")) is not None:
            held_out[result["step"]] = float(result["accuracy"])
    steps = sorted(held_out)
    add(
        "Held-out accuracy",
        [("greedy accuracy", steps, [held_out[s] for s in steps], {"marker": "o"})],
        "accuracy",
    )
    components = sorted(
        {k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")} - {"reward/mean"}
    )
    add(
        "Reward components",
        [(k[len("reward/") : -len("/mean")], *_series(rows, k), {}) for k in components],
        "mean",
    )
    add(
        "Completion length",
        [
            ("mean", *_series(rows, "completion_length/mean"), {}),
            ("max", *_series(rows, "completion_length/max"), {"alpha": 0.5}),
        ],
        "tokens",
        twin=("truncated fraction", *_series(rows, "truncated_fraction")),
    )
    add("KL to reference", [("kl", *_series(rows, "kl"), {})], "kl")
    add("SFT warm-up loss", [("loss", *_series(sft_rows, "loss"), {})], "loss")
    return plots


def _completion_cell(sample: dict | None) -> str:
    if sample is None:
        return "<td>-</td>"
    correct = sample.get("correct")
    mark = {True: " &#10003; correct", False: " &#10007; wrong"}.get(correct, "")  # absent in older runs
    return f"<td><pre>{html.escape(str(sample.get('completion', '')))}</pre>{mark}</td>"


def _samples_table(eval_history: dict) -> str:
    before = {s.get("prompt"): s for s in (eval_history.get("before") or {}).get("samples") or []}
    after = {s.get("prompt"): s for s in (eval_history.get("after") or {}).get("samples") or []}
    prompts = list(before) + [p for p in after if p not in before]
    if not prompts:
        return (
            "<p class='note'>no sample completions were saved (they come from the held-out evaluation).</p>"
        )
    cells = []
    for prompt in prompts:
        answer = html.escape(str((before.get(prompt) or after.get(prompt)).get("answer", "")))
        cells.append(
            f"<tr><td><pre>{html.escape(str(prompt))}</pre></td><td>{answer}</td>"
            f"{_completion_cell(before.get(prompt))}{_completion_cell(after.get(prompt))}</tr>"
        )
    head = "<tr><th>prompt</th><th>gold answer</th><th>before</th><th>after</th></tr>"
    return f"<table>{head}{''.join(cells)}</table>"


def _read_eval(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.html (atomically: a reader never sees half a page) and return its path."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    sft_rows = read_jsonl(run_dir / "sft" / "metrics.jsonl")
    eval_history = _read_eval(run_dir / "eval.json")
    config_path = run_dir / "config.yaml"
    config = config_path.read_text(errors="replace") if config_path.is_file() else None

    notes: list[str] = []
    train_steps = [r["step"] for r in rows if "reward/mean" in r or "loss" in r]
    if not rows:
        notes.append("no metrics.jsonl: no training step was logged.")
    if not eval_history:
        notes.append("no held-out evaluation was run (no eval.json).")
    else:
        missing = [tag for tag in ("before", "after") if tag not in eval_history]
        notes += [f"no held-out evaluation {tag} training." for tag in missing]
    if rows and not _series(rows, "kl")[0]:
        notes.append("KL was not logged (it is only computed when grpo.beta > 0).")

    last = f" (last step {max(train_steps)})" if train_steps else ""
    summary = f"{len(train_steps)} training steps{last}"
    before, after = eval_history.get("before") or {}, eval_history.get("after") or {}
    if _number(before.get("accuracy")) is not None and _number(after.get("accuracy")) is not None:
        summary += f"; held-out accuracy {before['accuracy']:.3f} &rarr; {after['accuracy']:.3f}"

    title = html.escape(run_dir.resolve().name)
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1><p>{summary}</p>",
        "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
        "<h2>Before / after</h2>",
    ]
    table = summary_rows(eval_history)
    if table:
        body = "".join(
            f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td class='num'>{v}</td>" for v in vals) + "</tr>"
            for m, *vals in table
        )
        parts.append(
            f"<table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>{body}</table>"
        )
    else:
        parts.append("<p class='note'>no held-out results to compare.</p>")
    parts.append("<h2>Training curves</h2>")
    plots = _plots(rows, eval_history, sft_rows)
    parts += [f"<img alt='{html.escape(t)}' src='{uri}'>" for t, uri in plots] or [
        "<p class='note'>nothing to plot.</p>"
    ]
    parts += [
        "<h2>Sample completions (held-out, greedy)</h2>",
        _samples_table(eval_history),
        "<h2>Config</h2>",
    ]
    if config is None:
        parts.append("<p class='note'>no config.yaml in the run directory.</p>")
    else:
        parts.append(f"<details><summary>resolved config</summary><pre>{html.escape(config)}</pre></details>")
    parts.append("</body></html>\n")

    target = run_dir / "report.html"
    tmp = run_dir / f".report.html.{os.getpid()}.tmp"  # same folder, so os.replace is an atomic rename
    try:
        tmp.write_text("\n".join(parts), encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
