"""Rollout backends: one contract run against graft's sampler and against VllmBackend on a fake vLLM engine
(tests/fakes/fake_vllm.py, a real tiny model behind vLLM's API), plus the backend's config checks."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from pydantic import ValidationError

from fakes import fake_vllm
from graft import algo
from graft.config import Config, GenerationConfig, LoraConfig
from graft.models import add_lora
from graft.rollout import backends
from graft.rollout.backends import GraftBackend, backend_problem, make_backend, resolve_backend
from graft.rollout.sampler import position_ids_from_mask
from graft.rollout.vllm_backend import VllmBackend, assemble_rollout

PROMPTS = [[1, 33, 31, 17, 6, 65, 7], [1, 40, 8], [1, 20, 21, 22, 23]]
# several stop ids, so a 12-token rollout has both stopped and truncated rows
STOPS = [2, 5, 9, 14, 23, 30, 41, 52]
G, MAX_NEW = 4, 12


def load_policy(folder, lora: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return add_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"]), seed=0).eval() if lora else model


def vllm_config(**generation) -> Config:
    return Config(generation=GenerationConfig(backend="vllm", **generation))


@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


def make(kind: str, folder, policy, **generation):
    if kind == "graft":
        return GraftBackend()
    backend = VllmBackend.create(str(folder), vllm_config(**generation), torch.float32)
    backend.sync_weights(policy)  # the loop syncs before the first rollout
    return backend


def rollout_of(backend, policy, seed: int = 0, pad_id: int = 0, **options):
    kw = dict(group_size=G, max_new_tokens=MAX_NEW, pad_id=pad_id, stop_ids=STOPS, temperature=0.7)
    kw.update(options)
    return backend.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(seed), **kw)


@torch.no_grad()
def forward_logprobs(model, rollout, temperature: float) -> torch.Tensor:  # (B, T)
    """log softmax(logits / T) of each sampled token from one plain forward over prompt + completion."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_mask)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = rollout.prompt_ids.shape[1]
    return (
        algo.token_logprobs(logits[:, P - 1 : -1], rollout.completion_ids, temperature)
        * rollout.completion_mask
    )


KINDS = ["graft", "vllm"]


# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("kind", KINDS)
def test_group_structure(kind, fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    r = rollout_of(make(kind, tiny_model_dir, policy), policy)
    assert r.group_size == G and r.completion_ids.shape[0] == len(PROMPTS) * G
    assert r.completion_ids.shape[1] <= MAX_NEW
    assert r.entropy is None or r.entropy.shape == r.logprobs.shape  # vLLM: None
    width = max(len(p) for p in PROMPTS)
    for row in range(len(PROMPTS) * G):
        prompt = PROMPTS[row // G]  # a group's completions are adjacent
        assert r.prompt_ids[row, width - len(prompt) :].tolist() == prompt
        assert r.prompt_mask[row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)


@pytest.mark.parametrize("pad_id", [0, 2])  # 2: pad is also a stop token (SmolLM2's pad is its EOS)
@pytest.mark.parametrize("kind", KINDS)
def test_masks_stops_and_truncation(kind, pad_id, fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    r = rollout_of(make(kind, tiny_model_dir, policy), policy, pad_id=pad_id)
    T = r.completion_ids.shape[1]
    for ids, mask, lps, truncated in zip(
        r.completion_ids, r.completion_mask, r.logprobs, r.truncated, strict=True
    ):
        n = int(mask.sum())
        assert mask.tolist() == [1] * n + [0] * (T - n)
        real = ids[:n].tolist()
        assert not any(t in STOPS for t in real[:-1])  # nothing after the first stop counts
        assert bool(truncated) == (real[-1] not in STOPS)
        if truncated:
            assert n == MAX_NEW
        assert ids[n:].tolist() == [pad_id] * (T - n) and lps[n:].abs().sum() == 0
        assert (lps[:n] < 0).all()
    assert r.truncated.any() and not r.truncated.all()  # both kinds of row were exercised


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_are_the_trainers_at_the_sampling_temperature(kind, temperature, fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    r = rollout_of(make(kind, tiny_model_dir, policy), policy, temperature=temperature)
    assert torch.allclose(r.logprobs, forward_logprobs(policy, r, temperature), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_is_argmax_with_logprobs_at_temperature_one(kind, fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    r = rollout_of(make(kind, tiny_model_dir, policy), policy, greedy=True, temperature=0.7)
    assert torch.allclose(r.logprobs, forward_logprobs(policy, r, 1.0), atol=1e-4)
    for g in range(len(PROMPTS)):  # the copies of a prompt agree
        rows = r.completion_ids[g * G : (g + 1) * G]
        assert (rows == rows[0]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_the_generator_seed_fixes_the_rollout(kind, fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    backend = make(kind, tiny_model_dir, policy)
    a, b, c = (rollout_of(backend, policy, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    rows = a.completion_ids[:G]
    assert any(not torch.equal(rows[0], row) for row in rows[1:])  # a group's copies draw differently


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_samples_follow_the_weights_after_an_optimizer_step(kind, lora, fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir, lora=lora)
    backend = make(kind, tiny_model_dir, policy)
    before = rollout_of(backend, policy)
    with torch.no_grad():  # an "optimizer step": LoRA B leaves zero, or every weight moves
        for name, p in policy.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    backend.sync_weights(policy)
    after = rollout_of(backend, policy)
    assert torch.allclose(after.logprobs, forward_logprobs(policy, after, 0.7), atol=1e-4)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    if kind == "vllm":
        llm = backend.llm
        assert len(llm.weight_loads) == 2 == backend.version  # one load per sync
        assert llm.prefix_cache_resets == 2
        all_names = set(llm.weight_loads[0])
        assert "model.layers.0.self_attn.q_proj.weight" in all_names and not any(
            "lora" in n for n in all_names
        )
        if lora:  # after the first load, only the adapted layers go over
            assert set(llm.weight_loads[1]) == {
                f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")
            }
        else:
            assert set(llm.weight_loads[1]) == all_names


def test_without_a_sync_the_engine_samples_stale_weights(fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir, lora=True)
    backend = make("vllm", tiny_model_dir, policy)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    stale = rollout_of(backend, policy)
    gap = (stale.logprobs - forward_logprobs(policy, stale, 0.7)).abs().max()
    assert gap > 1e-2  # the contract test above would have caught a missing sync


def test_a_load_without_a_prefix_cache_reset_would_be_caught(fake, tiny_model_dir, monkeypatch):
    policy = load_policy(tiny_model_dir, lora=True)
    backend = make("vllm", tiny_model_dir, policy)
    rollout_of(backend, policy)  # fills the prefix cache with the first weights
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    monkeypatch.setattr(backend.llm, "reset_prefix_cache", lambda: True)
    backend.sync_weights(policy)
    r = rollout_of(backend, policy)
    assert (r.logprobs[:, 0] - forward_logprobs(policy, r, 0.7)[:, 0]).abs().max() > 1e-2


def test_vllm_backend_asks_for_processed_logprobs(fake, tiny_model_dir):
    """vLLM's default raw_logprobs are pre-temperature: with T != 1 they are not the trainer's numbers."""
    policy = load_policy(tiny_model_dir)
    backend = make("vllm", tiny_model_dir, policy)
    assert backend.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    raw = VllmBackend(fake.LLM(str(tiny_model_dir)))  # an engine left at vLLM's default
    raw.sync_weights(policy)
    r = rollout_of(raw, policy, temperature=0.7)
    assert (r.logprobs - forward_logprobs(policy, r, 0.7)).abs().max() > 1e-2


def test_requests_are_g_seeded_copies_with_graft_stops(fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    backend = make("vllm", tiny_model_dir, policy)
    rollout_of(backend, policy)
    requests = backend.llm.requests
    assert [ids for ids, _ in requests] == [p for p in PROMPTS for _ in range(G)]
    assert all(
        sp.n == 1 and sp.logprobs == 0 and sp.ignore_eos and sp.stop_token_ids == STOPS for _, sp in requests
    )
    assert len({sp.seed for _, sp in requests}) == len(requests)


def test_sleep_between_rollouts(fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir, lora=True)
    backend = make("vllm", tiny_model_dir, policy, vllm_sleep=True)
    rollout_of(backend, policy)
    assert backend.llm.sleeping == {"weights", "kv_cache"}  # memory back to training until the next rollout
    backend.sync_weights(policy)  # wakes the weights only
    assert backend.llm.sleeping == {"kv_cache"}
    r = rollout_of(backend, policy)
    assert torch.allclose(r.logprobs, forward_logprobs(policy, r, 0.7), atol=1e-4)


def test_vllm_backend_refuses_what_it_cannot_match(fake, tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    unsynced = VllmBackend.create(str(tiny_model_dir), vllm_config(), torch.float32)
    with pytest.raises(RuntimeError, match="before sync_weights"):
        rollout_of(unsynced, policy)
    backend = make("vllm", tiny_model_dir, policy)
    with pytest.raises(ValueError, match="top_p"):
        rollout_of(backend, policy, top_p=0.9)
    with pytest.raises(ValueError, match="min_new_tokens"):
        rollout_of(backend, policy, min_new_tokens=2)


def test_create_passes_the_config(fake, tiny_model_dir):
    cfg = vllm_config(gpu_memory_utilization=0.5, vllm_max_model_len=128, vllm_sleep=True)
    backend = VllmBackend.create(str(tiny_model_dir), cfg, torch.float32)
    kwargs = backend.llm.kwargs
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["max_model_len"] == 128
    assert (
        kwargs["enable_sleep_mode"] and kwargs["enable_prefix_caching"] and kwargs["seed"] == cfg.train.seed
    )
    assert kwargs["dtype"] == "float32" and kwargs["generation_config"] == "vllm"
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # engine core in this process


def test_engine_outputs_are_checked_against_grafts_rules():
    cpu = torch.device("cpu")

    def out(ids: list[int], reason: str, stop_reason=None, logprobs: bool = True):
        lps = [{t: fake_vllm.Logprob(-1.0)} for t in ids] if logprobs else None
        completion = fake_vllm.CompletionOutput(0, "", ids, None, lps, reason, stop_reason)
        return fake_vllm.RequestOutput("0", None, [1], [completion])

    r = assemble_rollout([[1]], [out([4, 2], "stop", 2), out([4, 4, 4], "length")], 2, 0, [2], cpu)
    assert r.truncated.tolist() == [False, True] and r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.logprobs.tolist() == [[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]]
    # a stop token drawn as the last allowed token finished the completion, whatever finish_reason says
    assert not assemble_rollout([[1]], [out([4, 2], "length")], 1, 0, [2], cpu).truncated[0]
    with pytest.raises(RuntimeError, match="not one of graft's stop tokens"):
        assemble_rollout([[1]], [out([4, 7], "stop", 7)], 1, 0, [2], cpu)
    with pytest.raises(RuntimeError, match="abort"):
        assemble_rollout([[1]], [out([4], "abort")], 1, 0, [2], cpu)
    with pytest.raises(RuntimeError, match="no log-prob"):
        assemble_rollout([[1]], [out([4], "length", logprobs=False)], 1, 0, [2], cpu)


# ------------------------------------------------------------------------------------------ choosing a backend


def test_cpu_path_never_imports_vllm(tiny_model_dir):
    assert "vllm" not in sys.modules
    policy = load_policy(tiny_model_dir)
    backend = make_backend(Config(), "cpu", policy)
    assert isinstance(backend, GraftBackend)
    rollout_of(backend, policy)
    assert "vllm" not in sys.modules


def test_backend_problem_names_the_hardware_and_the_extra():
    assert backend_problem(Config(), "cpu") is None  # auto falls back
    assert backend_problem(Config(generation=GenerationConfig(backend="graft")), "cpu") is None
    problem = backend_problem(vllm_config(), "cpu")
    assert "NVIDIA GPU" in problem and "graft[vllm]" in problem and "generation.backend=graft" in problem
    assert resolve_backend(Config(), "cpu")[0] == "graft"
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        resolve_backend(vllm_config(), "cpu")


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend the device check passes, so the checks behind it can be reached on a CPU machine."""
    monkeypatch.setattr(backends, "_device_problem", lambda device: None)


def test_missing_or_old_vllm(gpu_here, monkeypatch):
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in backend_problem(vllm_config(), "cuda") and "graft[vllm]" in backend_problem(
        vllm_config(), "cuda"
    )
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(backends.importlib.metadata, "version", lambda name: "0.9.2")
    assert "too old" in backend_problem(vllm_config(), "cuda")
    monkeypatch.setattr(backends.importlib.metadata, "version", lambda name: "0.11.0")
    assert backend_problem(vllm_config(), "cuda") is None
    assert resolve_backend(Config(), "cuda") == ("vllm", None)  # auto takes vLLM where it can


def test_settings_vllm_cannot_match(gpu_here, fake):
    assert "top_p" in backend_problem(vllm_config(top_p=0.95), "cuda")
    assert "min_new_tokens" in backend_problem(vllm_config(min_new_tokens=3), "cuda")
    name, why = resolve_backend(Config(generation=GenerationConfig(top_p=0.95)), "cuda")
    assert name == "graft" and "top_p" in why  # auto falls back, saying why


def test_a_prequantized_checkpoint_is_refused(gpu_here, fake, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}})
    )
    cfg = vllm_config()
    cfg.model.name = str(tmp_path)
    assert "bitsandbytes-quantized" in backend_problem(cfg, "cuda")
    cfg.model.quantization = "4bit"  # graft's own quantization of a float checkpoint is fine
    cfg.model.name = "Qwen/Qwen2.5-0.5B-Instruct"
    assert backend_problem(cfg, "cuda") is None


def test_make_backend_builds_the_engine(gpu_here, fake, tiny_model_dir):
    cfg = vllm_config()
    cfg.model.name = str(tiny_model_dir)
    backend = make_backend(cfg, "cuda", load_policy(tiny_model_dir))
    assert isinstance(backend, VllmBackend) and backend.llm.kwargs["dtype"] == "float32"


def test_generation_config_fields():
    g = GenerationConfig()
    assert (g.backend, g.gpu_memory_utilization, g.vllm_sleep, g.vllm_max_model_len) == (
        "auto",
        0.3,
        False,
        None,
    )
    for bad in ({"backend": "sglang"}, {"gpu_memory_utilization": 1.0}, {"vllm_max_model_len": 0}):
        with pytest.raises(ValidationError):
            GenerationConfig(**bad)
