"""The paths a CPU without a feature takes, run on every machine by forcing the probe: same numbers where the
math is the same, a refusal before loading where the CPU would crawl."""

import json
import warnings

import pytest
import torch

from conftest import build_tiny_model
from graft.config import ConfigError, LoraConfig, load_config
from graft.cpu.decoder import Decoder
from graft.cpu.packed import PlainLinear
from graft.cpu.probe import FORCE_ENV, probe
from graft.cpu.sampling import SamplingCopy
from graft.doctor import report
from graft.models import add_lora, merged_adapter
from graft.rollout.sampler import sample
from graft.training.loop import train

VOCAB = 70
PROMPTS = [[1, 33, 31, 17, 6, 65, 7], [1, 40, 8], [1, 20, 21, 22, 23]]


@pytest.fixture
def policy():
    model = add_lora(build_tiny_model(VOCAB), LoraConfig(r=4), seed=0)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def _sample(copy: SamplingCopy, policy):
    with copy.sampling(policy) as model:
        return sample(model, PROMPTS, group_size=3, max_new_tokens=8, pad_id=0, stop_ids=[2, 11, 37],
                      generator=torch.Generator().manual_seed(3))  # fmt: skip


def test_unpacked_float32_decoder_samples_what_the_packed_one_does(policy, cpu_without):
    cpu_without()
    packed = _sample(SamplingCopy(policy, torch.float32, pack=True), policy)
    cpu_without("packed_float32")
    with pytest.warns(UserWarning, match=f"unpacked torch.float32 weights: turned off by {FORCE_ENV}"):
        copy = SamplingCopy(policy, torch.float32, pack=True)
    assert isinstance(copy.model, Decoder) and not copy.model.pack  # graft's decoder stays, on F.linear
    plain = _sample(copy, policy)
    assert isinstance(copy.refresh(policy).layers[0].qkv, PlainLinear)
    # the same float32 math in another summation order: the same tokens, log-probs to float32 rounding
    assert torch.equal(plain.completion_ids, packed.completion_ids)
    assert torch.allclose(plain.logprobs, packed.logprobs, atol=1e-5)


def test_bf16_copy_without_bf16_kernels_runs_unpacked_and_stays_close(policy, cpu_without):
    cpu_without("bfloat16")
    with pytest.warns(UserWarning, match="unpacked torch.bfloat16 weights"):
        copy = SamplingCopy(policy, torch.bfloat16, pack=True)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with copy.sampling(policy) as model, merged_adapter(policy) as reference, torch.no_grad():
        bf16, exact = model(ids).logits.float(), reference(input_ids=ids).logits
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9); logits here are O(1): ~1e-2 off, not another model
    assert 0 < (bf16 - exact).abs().max() < 0.05


def test_training_with_every_feature_forced_off_still_replays(tiny_model_dir, tmp_path, cpu_without):
    cpu_without("all")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "task.num_train=40", "task.num_eval=4",
                             "grpo.num_generations=4", "generation.max_new_tokens=6", "train.max_steps=2",
                             "train.prompts_per_step=2", "train.micro_batch_size=8", "gate.enabled=false",
                             "eval.at_start=false", "eval.at_end=false", f"logging.output_dir={tmp_path}",
                             "logging.run_name=forced", "logging.progress=lines", "logging.print_config=false"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "unpacked weights" notice, checked above
        run = train(cfg)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert len(steps) == 2 and all(m["replayed"] for m in steps)  # decoder and replay need no oneDNN


def test_a_bf16_run_without_bf16_kernels_is_refused_before_loading(tiny_model_dir, tmp_path, cpu_without):
    cpu_without("bfloat16")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"logging.output_dir={tmp_path}",
                             "logging.run_name=bf16", "generation.dtype=bfloat16", "train.autocast=bfloat16"])  # fmt: skip
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert "generation.dtype=bfloat16" in message and "use generation.dtype=float32" in message
    assert "train.autocast=bfloat16" in message and "use train.autocast=none" in message
    assert not (tmp_path / "bf16").exists()  # refused before the run directory was made


def test_doctor_reports_the_features_and_the_paths_with_their_reasons(cpu_without):
    cpu_without("packed_float32")
    data = report(load_config(None, ["generation.dtype=bfloat16"]), label="bf16 recipe")
    cpu = data["cpu"]
    assert cpu["model"] and cpu["arch"] and isinstance(cpu["flags"], list)
    assert cpu["supported"]["packed_float32"] is False and FORCE_ENV in cpu["why_not"]["packed_float32"]
    paths = data["fast_paths"]
    assert paths["recipe"] == "bf16 recipe" and paths["device"] == "cpu"
    assert bool(paths["problems"]) == (not probe().has("bfloat16"))
    assert data["optional"]["math-verify"]["for"].startswith("the math_equivalence reward")


def test_doctor_finds_the_model_shape_only_where_it_is_on_disk(tiny_model_dir, tmp_path):
    """A local folder's config decides the decoder path; a built-in not yet converted is left unknown
    (doctor never converts or downloads), under model.cache_dir as everywhere else."""
    here = report(load_config(None, [f"model.name={tiny_model_dir}"]))["fast_paths"]
    assert here["why"]["graft decoder"] == "on"
    empty_cache = report(load_config(None, [f"model.cache_dir={tmp_path}"]))["fast_paths"]
    assert empty_cache["why"]["graft decoder"].startswith("unknown")
    assert not (tmp_path / "models").exists()
