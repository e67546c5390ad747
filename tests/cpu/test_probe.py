"""The CPU probe and the plan it feeds: each path chosen by what the CPU can do, forced off on any machine."""

import platform

import pytest
import torch

from conftest import build_tiny_model
from graft.config import ConfigError, load_config
from graft.cpu.plan import plan_fast_paths
from graft.cpu.probe import FEATURES, FORCE_ENV

CPU = torch.device("cpu")
TINY_CONFIG = build_tiny_model(70).config  # a Llama: graft's decoder fits it


def test_the_probe_agrees_with_what_the_cpu_lists(cpu_without):
    caps = cpu_without()  # nothing forced: the machine's own answer
    assert set(caps.supported) == set(FEATURES)
    for feature, ok in caps.supported.items():
        assert ok or caps.missing(feature), f"{feature} is off without a reason"
    if not torch.backends.mkldnn.is_available():
        assert not any(caps.supported.values())
        return
    # torch routes 16-bit products to oneDNN by this check; the probe's real call must agree with it
    assert caps.has("bfloat16") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if platform.machine() == "x86_64" and not caps.caps:  # no ISA caps in the environment
        assert caps.has("packed_float32")  # oneDNN packs float32 on every x86-64 CPU torch supports
        # oneDNN's bf16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; AVX2 alone never has it
        bf16_isa = {"avx512bw", "avx512vl", "avx512dq"} <= set(caps.flags) or "avx_ne_convert" in caps.flags
        assert caps.has("bfloat16") == bf16_isa
    line = caps.summary()
    assert caps.model in line and all(f in line for f in caps.flags)


def test_forcing_the_probe_turns_features_off_and_says_so(cpu_without):
    caps = cpu_without("bfloat16")
    assert not caps.has("bfloat16") and FORCE_ENV in caps.missing("bfloat16")
    caps = cpu_without("all")
    assert not any(caps.supported.values())
    with pytest.raises(ConfigError, match="unknown feature.*bfloat61.*known: packed_float32"):
        cpu_without("bfloat61")  # a typo would otherwise test nothing


def _plan(*overrides, model_config=TINY_CONFIG, device=CPU):
    return plan_fast_paths(load_config(None, list(overrides)), device, model_config)


def test_default_plan_takes_every_fast_path_the_cpu_has(cpu_without):
    caps = cpu_without()
    paths = _plan()
    assert paths.pack == caps.has("packed_float32")
    assert paths.own_decoder and paths.replay and not paths.problems
    assert "graft's decoder" in paths.describe() and "replayed update" in paths.describe()


def test_without_packing_the_decoder_and_the_replay_stay(cpu_without):
    cpu_without("packed_float32")
    paths = _plan()
    assert not paths.pack and paths.own_decoder and paths.replay and not paths.problems
    assert paths.why["packed weights"] == f"off: turned off by {FORCE_ENV}"
    assert "on float32 weights" in paths.describe() and "packed" not in paths.describe().split("(")[0]


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["generation.dtype=bfloat16", "train.autocast=bfloat16"], ["generation.dtype", "train.autocast"]),
        (["model.dtype=bfloat16"], ["model.dtype"]),
        (["train.autocast=float16"], ["train.autocast"]),
    ],
)
def test_16_bit_products_the_cpu_lacks_are_refused_with_the_setting_to_change(cpu_without, overrides, keys):
    cpu_without("bfloat16", "float16")
    problems = _plan(*overrides).problems
    assert len(problems) == len(keys)
    for problem, key in zip(problems, keys, strict=True):
        fix = f"{key}=none" if key == "train.autocast" else f"{key}=float32"
        assert problem.startswith(f"{key}=") and fix in problem and FORCE_ENV in problem


def test_bf16_runs_are_planned_where_the_cpu_has_bf16(cpu_without):
    caps = cpu_without("float16")
    paths = _plan("generation.dtype=bfloat16", "train.autocast=bfloat16")
    assert (not paths.problems) == caps.has("bfloat16")
    assert paths.replay  # the mixed-precision pair replays wherever it is allowed to run


def test_off_the_cpu_nothing_is_packed_and_nothing_is_refused(cpu_without):
    cpu_without("all")
    paths = _plan("model.dtype=bfloat16", device=torch.device("cuda"))
    assert not paths.problems and not paths.pack and paths.own_decoder is False and paths.replay is False
    assert "graft's own decoder" in paths.why["replayed update"]


def test_without_the_model_config_the_model_dependent_paths_are_unknown():
    paths = _plan(model_config=None)
    assert paths.own_decoder is None and paths.replay is None
