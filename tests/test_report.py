"""The HTML run report, built from a synthetic run directory (no model, no network)."""

from __future__ import annotations

import html
import json
import re

from graft.report import read_jsonl, summary_rows, write_report

TRICKY = "What is 2 <b>+</b> 3 & 4?"


def _eval_result(step: int, accuracy: float, completions: list[str], correct: list[bool]) -> dict:
    prompts = [TRICKY, "What is 7 * 6?"]
    return {
        "step": step,
        "accuracy": accuracy,
        "num_problems": 50,
        "mean_length": 30.0 if step == 0 else 22.5,
        "p95_length": 64.0 if step == 0 else 40.0,
        "truncated_fraction": 0.1 if step == 0 else 0.0,
        "accuracy_strict": 0.3 if step == 0 else 0.55,
        "format_compliance": 0.5 if step == 0 else 0.9,
        "pass_at_k": {"1": accuracy, "4": accuracy + 0.2},
        "maj_at_k": {"4": accuracy + 0.1},
        "samples": [
            {"prompt": p, "answer": a, "completion": c, "correct": ok}
            for p, a, c, ok in zip(prompts, ["9", "42"], completions, correct, strict=True)
        ],
    }


def _metrics_row(step: int, reward: float, kl: float | None = 0.01) -> dict:
    return {
        "step": step,
        "reward/mean": reward,
        "reward/std": 0.3,
        "reward/last_integer/mean": reward,
        "reward/format_tags/mean": 0.2,
        "accuracy": reward,
        "completion_length/mean": 12.5,
        "completion_length/max": 40,
        "truncated_fraction": 0.1,
        "kl": kl,
        "loss": 0.02,
        "grad_norm": 0.5,
        "tokens_per_s": 90.0,
        "time/step": 10.2,
    }


def _write_jsonl(path, rows, torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def _images(page: str) -> int:
    return page.count("data:image/png;base64,")


def test_full_report(tmp_path):
    run = tmp_path / "gsm8k-run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: tiny <model> & co\ngrpo:\n  beta: 0.04\n")
    rows = [{"step": 0, "eval/accuracy": 0.41}]
    rows += [_metrics_row(s, 0.1 * s) for s in range(1, 5)]
    rows += [_metrics_row(3, 0.777)]  # a resumed run re-did step 3: this row wins
    rows += [{"step": 4, "eval/accuracy": 0.62}]  # final eval row must not wipe step 4's training metrics
    _write_jsonl(run / "metrics.jsonl", rows, torn='{"step": 5, "reward/me')
    _write_jsonl(run / "sft" / "metrics.jsonl", [{"step": s, "loss": 2.0 / s} for s in range(1, 4)])
    history = {
        "before": _eval_result(0, 0.41, ["I think <i>8</i>", "42"], [False, True]),
        "step_2": {
            "step": 2,
            "accuracy": 0.5,
            "num_problems": 50,
            "mean_length": 25.0,
            "truncated_fraction": 0.0,
        },
        "after": _eval_result(4, 0.62, ["2+3=5, 5&4... 9", "41"], [True, False]),
    }
    (run / "eval.json").write_text(json.dumps(history))

    parsed = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in parsed] == [0, 1, 2, 3, 4]
    assert parsed[3]["reward/mean"] == 0.777
    assert parsed[4]["reward/mean"] == 0.4 and parsed[4]["eval/accuracy"] == 0.62

    path = write_report(run)
    assert path == run / "report.html" and path.is_file()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    page = path.read_text()

    assert "<h1>gsm8k-run</h1>" in page
    assert "4 training steps" in page and "0.410 &rarr; 0.620" in page
    assert re.search(r"greedy accuracy</td><td class='num'>0\.410</td><td class='num'>0\.620</td>"
                     r"<td class='num'>\+0\.210</td>", page)  # fmt: skip
    assert "pass@4" in page and "maj@4" in page and "p95 length" in page
    # reward, held-out accuracy, reward components, length, KL, SFT loss
    assert _images(page) == 6
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<link" not in page and "<b>" not in page
    assert html.escape(TRICKY) in page
    assert "tiny &lt;model&gt; &amp; co" in page and "<details>" in page

    # before and after completions of the same prompt share a table row
    row = next(r for r in page.split("<tr>") if html.escape(TRICKY) in r)
    assert "I think &lt;i&gt;8&lt;/i&gt;" in row and "2+3=5, 5&amp;4... 9" in row
    assert "&#10007;" in row and "&#10003;" in row
    assert "no held-out evaluation was run" not in page

    write_report(run)  # rewriting over an existing report works
    assert _images(path.read_text()) == 6


def test_report_with_only_metrics(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [_metrics_row(s, 0.2, kl=None) for s in range(1, 4)])
    page = write_report(run).read_text()
    assert "no held-out evaluation was run" in page
    assert "no config.yaml" in page
    assert "KL was not logged" in page
    assert "KL to reference" not in page and "Held-out accuracy" not in page
    assert _images(page) == 3  # reward, reward components, length: no KL, held-out or SFT plot
    assert "no held-out results to compare" in page


def test_report_of_empty_run_dir(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "no metrics.jsonl" in page and "no held-out evaluation was run" in page
    assert _images(page) == 0


def test_summary_rows():
    before = {
        "step": 0,
        "accuracy": 0.25,
        "unseen_accuracy": 0.125,
        "mean_length": 100.0,
        "truncated_fraction": 0.2,
        "pass_at_k": {"1": 0.25, "16": 0.6, "4": 0.5},
        "maj_at_k": {},
        "accuracy_by_kind": {"subtraction": 0.5, "addition": 0.25},
    }
    after = {
        "step": 10,
        "accuracy": 0.5,
        "unseen_accuracy": 0.5,
        "mean_length": 80.3,
        "truncated_fraction": 0.2,
        "accuracy_strict": 0.4,
        "pass_at_k": {"1": 0.5, "4": 0.45, "16": 0.7},
        "accuracy_by_kind": {"addition": 0.75, "subtraction": 0.5, "subtraction below 0": 0.0},
    }
    rows = summary_rows({"before": before, "after": after})
    assert rows == [
        ("greedy accuracy", "0.250", "0.500", "+0.250"),
        ("greedy accuracy, unseen phrasing", "0.125", "0.500", "+0.375"),
        ("strict accuracy", "-", "0.400", "-"),
        ("greedy accuracy, addition", "0.250", "0.750", "+0.500"),
        ("greedy accuracy, subtraction", "0.500", "0.500", "+0.000"),
        ("greedy accuracy, subtraction below 0", "-", "0.000", "-"),
        ("pass@1", "0.250", "0.500", "+0.250"),
        ("pass@4", "0.500", "0.450", "-0.050"),
        ("pass@16", "0.600", "0.700", "+0.100"),
        ("mean length", "100.0", "80.3", "-19.7"),
        ("truncation", "0.200", "0.200", "+0.000"),
    ]
    only_before = summary_rows({"before": before})
    assert only_before[0] == ("greedy accuracy", "0.250", "-", "-")
    assert summary_rows({}) == []
