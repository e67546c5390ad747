"""The replayed update (train.replay: backward through the rollout's recorded forward) against the
two-pass update it replaces: same loss, same LoRA gradients, up to float32 summation order."""

import pytest
import torch

from conftest import build_tiny_model, build_tiny_qwen2
from graft import algo
from graft.config import LoraConfig, load_config
from graft.cpu.decoder import Recording
from graft.cpu.plan import plan_fast_paths
from graft.cpu.replay import replay_backward
from graft.cpu.sampling import SamplingCopy
from graft.models import add_lora
from graft.rollout.sampler import sample
from graft.training.grpo import completion_logprobs

VOCAB = 70
PROMPTS = [[1, 33, 31, 17, 6, 65, 7], [1, 40, 8], [1, 20, 21, 22, 23]]
STOPS = [2, 11, 23, 37, 51, 64]  # ~9% of the vocabulary: completions of many lengths
MODELS = {"llama": lambda: build_tiny_model(VOCAB), "qwen2": lambda: build_tiny_qwen2(VOCAB)}


def adapted(model):
    model = add_lora(model, LoraConfig(r=4), seed=0)
    with torch.no_grad():  # a trained-looking adapter: B starts at zero, which would hide A's gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def recorded_rollout(
    model, temperature: float, group_size: int = 4, max_new_tokens: int = 9, dtype=torch.float32
):
    copy = SamplingCopy(model, dtype, pack=True)
    recording = Recording()
    with copy.sampling(model, recording) as decoder:
        r = sample(decoder, PROMPTS, group_size=group_size, max_new_tokens=max_new_tokens, pad_id=0,
                   stop_ids=STOPS, temperature=temperature, generator=torch.Generator().manual_seed(5))  # fmt: skip
    return r, recording


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss_type, entropy_coef", [("dapo", 0.0), ("grpo", 0.0), ("dapo", 0.3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("arch", list(MODELS))
def test_replayed_backward_gives_the_two_pass_loss_and_gradients(arch, temperature, loss_type, entropy_coef):
    model = adapted(MODELS[arch]())
    r, recording = recorded_rollout(model, temperature)
    lengths = r.completion_lengths
    assert lengths.min() < lengths.max() == r.completion_ids.shape[1]  # rows left the batch mid-rollout
    advantages = torch.linspace(-1.5, 1.0, len(lengths))

    def loss_fn(logprobs):  # with entropy_coef, the entropy bonus against the sampler's logged entropy
        return algo.policy_loss(logprobs, logprobs.detach(), advantages, r.completion_mask, loss_type=loss_type,
                                num_sequences=len(lengths), num_tokens=int(lengths.sum()), max_completion_length=9,
                                entropy_coef=entropy_coef, entropy_baseline=r.entropy)  # fmt: skip

    model.train()
    logprobs = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                   temperature)  # fmt: skip
    expected = loss_fn(logprobs)
    expected.loss.backward()
    expected_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)

    out = replay_backward(model, recording, r, temperature, loss_fn)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    grads = lora_grads(model)
    assert (
        grads.keys() == expected_grads.keys() and len(grads) == 2 * 7 * 2
    )  # A and B, 7 projections, 2 layers
    for name, g in grads.items():
        want = expected_grads[name]
        assert want.abs().max() > 0, name  # every factor gets a gradient here, so none can hide a mistake
        # float32 both, through different kernels: the replay backpropagates through the sampler's packed
        # oneDNN forward, the two-pass update through ATen's. A product of reduction length K <= 128
        # differs by up to ~K * eps (1.5e-5) of its scale between two summation orders, and layer 0's
        # gradient passes through ~6 of them forward and back (2 layers, attention and MLP), so ~1e-4 of
        # the tensor's largest entry (measured: up to 2.1e-5 on an Intel Xeon with AMX; an AMD EPYC Zen 4
        # stayed within 1e-5). A wrong gradient (a missed term, a wrong mask) is off by its own size.
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), name
    assert not recording.layers and not recording.final  # consumed, its memory freed


def test_mixed_precision_replay_is_close_to_the_float32_gradient():
    """bfloat16 sampling copy + bfloat16 autocast (graft-bf16): the replay backpropagates through the bf16
    sampler's forward, an approximation like autocast's, held to the same bar as the autocast training pass
    (tests/training/test_fast_paths.py): gradients pointing the same way as float32's."""
    model = add_lora(build_tiny_model(VOCAB), LoraConfig(r=4), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    r, recording = recorded_rollout(model, 1.0, dtype=torch.bfloat16)
    advantages = torch.linspace(-1.5, 1.0, r.completion_ids.shape[0])

    def loss_fn(logprobs):
        return algo.policy_loss(logprobs, logprobs.detach(), advantages, r.completion_mask, loss_type="dapo",
                                num_sequences=len(advantages), num_tokens=int(r.completion_mask.sum()),
                                max_completion_length=9)  # fmt: skip

    model.train()
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
    expected = loss_fn(completion_logprobs(model, *args))
    expected.loss.backward()
    want = torch.cat([g.flatten() for g in lora_grads(model).values()])
    model.zero_grad(set_to_none=True)
    out = replay_backward(model, recording, r, 1.0, loss_fn)
    got = torch.cat([g.flatten() for g in lora_grads(model).values()])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=0.05, abs=1e-3)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95
    assert got.norm() == pytest.approx(want.norm().item(), rel=0.1)


def test_only_graft_decoder_records():
    model = adapted(build_tiny_model(VOCAB))
    copy = SamplingCopy(model, torch.float32, pack=True, own_decoder=False)  # transformers modules, packed
    with (
        pytest.raises(ValueError, match="only graft's own decoder records"),
        copy.sampling(model, Recording()),
    ):
        pass


def test_a_rollout_without_recording_matches_one_with():
    """Recording unfuses the gate's SiLU: samples and log-probs must not change."""
    model = adapted(build_tiny_model(VOCAB))
    r_rec, _ = recorded_rollout(model, 1.0)
    copy = SamplingCopy(model, torch.float32, pack=True)
    with copy.sampling(model) as decoder:
        r = sample(decoder, PROMPTS, group_size=4, max_new_tokens=9, pad_id=0, stop_ids=STOPS, temperature=1.0,
                   generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(r.completion_ids, r_rec.completion_ids)
    assert torch.allclose(r.logprobs, r_rec.logprobs, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ([], None),
        (["grpo.num_iterations=2"], "outlives an update"),
        (["grpo.num_minibatches=2"], "outlives an update"),
        (["train.micro_batch_size=4"], "micro_batch_size (4) is below the batch (8)"),
        (["generation.dtype=bfloat16", "train.autocast=bfloat16"], None),  # mixed precision, both sides
        (["generation.dtype=bfloat16"], "float32 throughout or bfloat16 sampling with bfloat16 autocast"),
        (["train.autocast=bfloat16"], "float32 throughout or bfloat16 sampling with bfloat16 autocast"),
        (["generation.pack_weights=false"], "graft's own decoder"),
        (["lora.dropout=0.1"], "dropout"),
        (["lora.enabled=false"], "full fine-tuning"),
        (["lora.target_modules=[q_proj,lm_head]"], "LoRA on lm_head"),
    ],
)
def test_replay_names_why_it_cannot_run(overrides, reason):
    cfg = load_config(None, ["grpo.num_generations=4", "train.prompts_per_step=2", "train.micro_batch_size=8",
                             *overrides])  # fmt: skip
    model = build_tiny_model(VOCAB)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, seed=0)
    paths = plan_fast_paths(cfg, torch.device("cpu"), model=model)  # the plan, settled for the loaded model
    problem = None if paths.replay else paths.why["replayed update"]
    assert problem is None if reason is None else reason in problem
