"""The training loop with the vLLM backend, on the fake engine (tests/fakes/fake_vllm.py, a real tiny model
behind vLLM's API): weights synced before the first rollout and after each step's updates, the
sampler/trainer mismatch logged each step, truncated importance weights in the loss."""

import json

import pytest
import torch

from fakes import fake_vllm
from graft import algo
from graft.config import load_config
from graft.rewards import builtin
from graft.rollout.vllm_backend import VllmBackend
from graft.training import loop


def _digit_share(prompts, completions, **_):
    from graft.text import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def fake_engines(monkeypatch, model_dir) -> list[VllmBackend]:
    """The loop's rollout backends, on the fake engine: the real factory refuses a CPU, while the engine
    itself is vLLM's API. Returns the list each run's engine is added to."""
    fake_vllm.install(monkeypatch)
    engines = []

    def make_backend(cfg, device, policy):
        engines.append(VllmBackend.create(str(model_dir), cfg, torch.float32))
        return engines[-1]

    monkeypatch.setattr(loop, "make_backend", make_backend)
    return engines


def test_a_run_on_the_vllm_backend_syncs_before_every_rollout_and_logs_the_mismatch(
    tiny_model_dir, tmp_path, monkeypatch
):
    engines = fake_engines(monkeypatch, tiny_model_dir)
    monkeypatch.setitem(builtin.BUILTIN_REWARDS, "digit_share", _digit_share)
    cfg = load_config(
        None,
        [f"model.name={tiny_model_dir}", "rewards.functions=[digit_share]", "task.num_train=8",
         "task.num_eval=2", "grpo.num_generations=3", "grpo.num_minibatches=2", "generation.max_new_tokens=6",
         "generation.pack_weights=false", "train.max_steps=2", "train.prompts_per_step=2",
         "train.learning_rate=0.05", "gate.enabled=false", "eval.at_start=false", "eval.at_end=false",
         f"logging.output_dir={tmp_path}", "logging.run_name=v", "logging.progress=lines",
         "logging.print_config=false", "grpo.entropy_target=100", "grpo.entropy_coef_step=0.01"],
    )  # fmt: skip
    run = loop.train(cfg)
    (engine,) = engines
    # before the first rollout, then after each step's 2 optimizer steps: every rollout samples the policy
    # as the last optimizer step left it (syncing between a step's own minibatches would serve no rollout)
    assert engine.version == 1 + 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    for row in steps:
        # the fake engine runs the same float32 model: its log-probs match the trainer's up to float noise
        # before the first update of a step (old log-probs); a missed sync would show as a large KL
        assert row["sampler_kl"] < 1e-4 and row["sampler_abs_logp_diff"] < 1e-2
        assert row["health/sampler_mismatch"] == 0.0
    # the engine logs no entropy: entropy control reads the sampled estimate (far below the target here)
    assert all("entropy" not in r and r["surprisal"] > 0 for r in steps)
    assert [r["entropy_coef"] for r in steps] == pytest.approx([0.0, 0.01])


def test_token_weights_scale_each_tokens_surrogate_and_leave_the_kl_alone():
    # one sequence, two tokens, ratio 1 (logprobs = old), advantage 1: each token's surrogate is -1.
    # weights (2, 0.5) make them -2 and -0.5; dapo averages over the 2 tokens: (-2 - 0.5) / 2 = -1.25.
    # with beta = 0.1 and ref = logprobs the KL term is 0, so the loss stays -1.25
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = algo.policy_loss(
        logprobs, logprobs.detach(), torch.tensor([1.0]), torch.ones(1, 2), loss_type="dapo",
        num_sequences=1, num_tokens=2, max_completion_length=2, beta=0.1, ref_logprobs=logprobs.detach(),
        token_weights=torch.tensor([[2.0, 0.5]]),
    )  # fmt: skip
    assert out.loss.item() == pytest.approx(-1.25)
    out.loss.backward()
    # d/dlogp of -A * ratio * w / 2 at ratio 1 is -w / 2 (the KL's gradient is 0 at logp = ref)
    assert logprobs.grad[0].tolist() == pytest.approx([-1.0, -0.25])


def test_a_multi_turn_run_plays_its_episodes_on_the_engine(tiny_model_dir, tmp_path, monkeypatch):
    from test_episodes_loop import counting_config

    engines = fake_engines(monkeypatch, tiny_model_dir)
    cfg = counting_config(tiny_model_dir, tmp_path, "ve", "eval.at_start=false", "eval.at_end=false")
    run = loop.train(cfg)
    (engine,) = engines
    # one request per reply of every episode played (the environment breaks on rows with an even answer,
    # before any reply), and none through the policy
    completions = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    replies = sum(c["completion"].count("[assistant]") for c in completions)
    assert replies > 0 and len(engine.llm.requests) == replies and engine.version == 1 + 2
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2 and all(r["sampler_kl"] < 1e-4 for r in steps)  # the trainer's numbers
