"""The chained recipe (SFT -> gate -> GRPO) on the built-in model, then every command that uses its result:
eval, generate, chat (piped stdin), compare, report and export (merged parity, adapter, GGUF, hub errors)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graft.cli import main
from graft.config import load_config
from graft.training.gate import GateError
from graft.training.loop import train

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).parent.parent / "configs" / "arithmetic_sft.yaml"
SMALL = ["sft.max_steps=20", "train.max_steps=1", "train.prompts_per_step=2", "grpo.num_generations=4",
         "gate.num_prompts=2", "generation.max_new_tokens=32", "eval.num_prompts=8", "eval.every_n_steps=0",
         "eval.num_samples=2", "logging.progress=lines", "logging.print_config=false"]  # fmt: skip


@pytest.fixture(scope="module")
def chained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(load_config(RECIPE, [*SMALL, f"logging.output_dir={out}", "logging.run_name=chained"]))


def test_without_the_warmup_the_gate_stops_the_run_before_grpo(tmp_path):
    cfg = load_config(
        RECIPE, [*SMALL, "sft.enabled=false", f"logging.output_dir={tmp_path}", "logging.run_name=x"]
    )
    with pytest.raises(GateError, match="scored 0 on every one for .*format_strict.*SFT warm-up"):
        train(cfg)
    run = tmp_path / "x"
    gate = json.loads((run / "gate.json").read_text())
    assert gate["passed"] is False and gate["rewards"]["format_strict"]["nonzero"] == 0
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").read_text().strip()


def test_the_chained_recipe_warms_up_passes_the_gate_and_trains(chained_run):
    assert (chained_run / "sft" / "final" / "adapter_config.json").is_file()
    sft_losses = [
        json.loads(x)["loss"] for x in (chained_run / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sft_losses[-1] < sft_losses[0] / 3
    gate = json.loads((chained_run / "gate.json").read_text())
    assert gate["passed"] and gate["rewards"]["format_strict"]["nonzero"] > 0
    assert load_config(chained_run / "config.yaml").model.adapter == str(chained_run / "sft" / "final")
    evals = json.loads((chained_run / "eval.json").read_text())
    for tag in ("before", "after"):
        assert evals[tag]["format_compliance"] > 0.5  # the warm-up taught the tags
        assert set(evals[tag]["pass_at_k"]) == {"1", "2"} and set(evals[tag]["maj_at_k"]) == {"2"}
        assert len(evals[tag]["samples"]) == 8
    html = (chained_run / "report.html").read_text()
    assert "greedy accuracy" in html and "data:image/png;base64," in html
    assert evals["after"]["samples"][0]["prompt"] in html


def test_eval_generate_and_compare_use_the_run(chained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(["eval", "--run", str(chained_run), "--num", "4", "--samples", "2", "--output", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["num_problems"] == 4 and set(result["pass_at_k"]) == {"1", "2"}
    assert 0 <= result["pass_at_k"]["1"] <= result["pass_at_k"]["2"] <= 1
    capsys.readouterr()

    assert main(["generate", "--run", str(chained_run), "--prompt", "What is 3 + 4?", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["prompt"] == "What is 3 + 4?" and "<answer>" in reply["completion"]  # the run's format

    assert main(["compare", "--run", str(chained_run), "--num", "2"]) == 0
    shown = capsys.readouterr().out
    assert "before (start of the run)" in shown and "after (tuned)" in shown and "correct: before" in shown


def test_chat_through_piped_stdin_keeps_the_conversation(chained_run):
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "graft.cli", "chat", "--run", str(chained_run), "--max-new-tokens", "24"],
        input="What is 2 + 3?\n/reset\nWhat is 6 - 1?\n/exit\nnever read\n",
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.startswith("assistant>")]
    assert len(replies) == 2 and "(conversation reset)" in done.stdout
    assert "<reasoning>" in replies[0]  # the run's system prompt and format reached the model


def test_export_merged_matches_the_adapter_and_loads_in_plain_transformers(chained_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert main(["export", "--run", str(chained_run), "--to", str(out), "--adapter", "--gguf"]) == 0
    shown = capsys.readouterr().out
    parity = json.loads((out / "merged" / "parity.json").read_text())
    assert parity["parity_max_abs_logprob_diff"] < 1e-3 and parity["parity_tokens"] > 20
    assert "parity: max |log-prob difference|" in shown
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "merged" / "graft_export.json").read_text())["prompt_format"] == "reasoning"
    assert (out / "chained-f16.gguf").is_file() and "gguf:" in shown

    # plain transformers, no peft, no graft: the same greedy reply as `graft generate --run`
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    system = json.loads((out / "merged" / "graft_export.json").read_text())["system_prompt"]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is 5 + 6?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=32, do_sample=False)
    text = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert main(["generate", "--run", str(chained_run), "--prompt", "What is 5 + 6?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"] == text

    assert main(["export", "--run", str(chained_run), "--to", str(out)]) == 2  # will not overwrite
    assert "--force" in capsys.readouterr().err


def test_a_failed_parity_check_removes_the_merged_folder(chained_run, tmp_path):
    from graft.exporter import ExportError, export_merged
    from graft.inference import resolve_target

    target = resolve_target(str(chained_run), None, [])
    with pytest.raises(ExportError, match="parity check failed.*adapter itself is intact"):
        export_merged(target, tmp_path / "merged", tolerance=-1.0)  # no difference passes a negative bound
    assert not (tmp_path / "merged").exists()


def test_push_to_hub_failure_is_explained(tmp_path):
    from graft.exporter import ExportError, push_to_hub

    (tmp_path / "model").mkdir()
    with pytest.raises(ExportError, match="could not push .*someone/graft-test.*hf auth login"):
        push_to_hub(tmp_path / "model", "someone/graft-test", endpoint="http://127.0.0.1:9")
