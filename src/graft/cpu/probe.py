"""What this CPU and this torch build can do, found once per process by tiny real calls.

Every instruction-set-dependent path graft takes (oneDNN-packed weights, bfloat16 products) is chosen from
this, never assumed from one developer's machine. The flags read from the OS explain an answer; the real
call decides it, so a capped oneDNN (ONEDNN_MAX_CPU_ISA) or an odd build answers truthfully too.

GRAFT_CPU_UNSUPPORTED=name[,name...] (or "all") makes the probe answer "unsupported" for those features
whatever the CPU can do, so every fallback can be exercised (and is, in the tests) on any machine.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from graft.config import ConfigError

FORCE_ENV = "GRAFT_CPU_UNSUPPORTED"

# feature: what needs it
FEATURES = {
    "packed_float32": "oneDNN-packed float32 weights for the rollout (generation.pack_weights)",
    "bfloat16": "bfloat16 products through oneDNN (model.dtype, generation.dtype or train.autocast = bfloat16)",
    "float16": "float16 products through oneDNN (model.dtype, generation.dtype or train.autocast = float16)",
}

# The flags that decide the paths above (and their speed), as Linux names them. oneDNN runs bfloat16 with
# AVX512-BW/VL/DQ (converting in registers), natively with AVX512-BF16 or AMX, or with AVX-NE-CONVERT on
# AVX2-only chips; without any of them torch computes 16-bit products in a reference kernel.
X86_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "avx_ne_convert",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
)
ARM_FLAGS = ("asimd", "asimddp", "fphp", "sve", "sve2", "bf16", "i8mm")
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


@dataclass(frozen=True)
class CpuCapabilities:
    model: str  # the CPU's name as the OS gives it
    arch: str  # x86_64, aarch64, arm64
    flags: tuple[str, ...]  # the relevant ISA flags present (X86_FLAGS / ARM_FLAGS)
    aten: str  # the kernel level ATen dispatches to (AVX512, AVX2, DEFAULT, SVE256, ...)
    caps: dict[str, str]  # ISA caps set in the environment
    supported: dict[str, bool]  # feature -> the real call worked (and was not forced off)
    why: dict[str, str] = field(default_factory=dict)  # feature -> why not, for the unsupported ones

    def has(self, feature: str) -> bool:
        return self.supported[feature]

    def missing(self, feature: str) -> str:
        """One phrase for a message: why `feature` is off here, with what would turn it on."""
        return self.why.get(feature, "")

    def summary(self) -> str:
        """One line: the CPU, its relevant flags and what the probe found."""
        flags = " ".join(self.flags) or "none of the relevant ones"
        found = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in self.supported.items())
        capped = f"; capped by {' '.join(f'{k}={v}' for k, v in self.caps.items())}" if self.caps else ""
        return f"{self.model} ({self.arch}; {flags}; ATen {self.aten}{capped}): {found}"

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "arch": self.arch,
            "flags": list(self.flags),
            "aten_capability": self.aten,
            "isa_caps": self.caps,
            "supported": self.supported,
            "why_not": self.why,
        }


def forced_off() -> set[str]:
    """The features GRAFT_CPU_UNSUPPORTED turns off; unknown names are an error (a typo would test nothing)."""
    raw = os.environ.get(FORCE_ENV, "").strip()
    if not raw:
        return set()
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if names == {"all"}:
        return set(FEATURES)
    unknown = names - set(FEATURES)
    if unknown:
        raise ConfigError(
            f"{FORCE_ENV}: unknown feature(s) {sorted(unknown)}; known: {', '.join(FEATURES)}, all"
        )
    return names


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU name, every flag the OS lists) on Linux and macOS; ('unknown', set()) elsewhere."""
    name, flags = platform.processor() or "unknown", set()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    key = key.strip()
                    if key in ("model name", "Model", "CPU part") and name in (
                        "unknown",
                        "",
                        platform.machine(),
                    ):
                        name = value.strip()
                    elif key in ("flags", "Features"):
                        flags |= set(value.split())
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            name = _sysctl("machdep.cpu.brand_string") or name
            if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
                flags.add("bf16")
            if _sysctl("hw.optional.AdvSIMD") == "1":
                flags.add("asimd")
        except OSError:
            pass
    return name, flags


def _sysctl(key: str) -> str:
    done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    return done.stdout.strip() if done.returncode == 0 else ""


def _packed_linear_works(dtype: torch.dtype) -> str | None:
    """Pack a small weight for oneDNN and multiply with it, as graft's PackedLinear does; None when the
    result matches F.linear, else what went wrong."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 32, generator=generator)
        x = torch.randn(4, 32, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), 16)
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    expected = F.linear(x.to(dtype).float(), weight.to(dtype).float())
    # inputs rounded to `dtype`, 32-term sums accumulated in float32: anything past 1e-2 is a broken kernel
    if y.dtype != dtype or not torch.allclose(y.float(), expected, atol=1e-2, rtol=1e-2):
        return (
            f"the packed product gave wrong values (largest error {(y.float() - expected).abs().max():.3g})"
        )
    return None


def _half_products_native(dtype: torch.dtype) -> bool:
    """Whether torch routes matrix products in this 16-bit dtype to oneDNN (else a reference kernel, many
    times slower than float32). The same check torch applies before it packs such weights."""
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    check = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return False


@functools.cache
def probe() -> CpuCapabilities:
    """This process's answer (cached: the calls take milliseconds, but once is enough)."""
    name, all_flags = _cpuinfo()
    arch = platform.machine()
    relevant = X86_FLAGS if arch in ("x86_64", "AMD64", "i686") else ARM_FLAGS
    flags = tuple(f for f in relevant if f in all_flags)
    caps = {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}
    aten = torch.backends.cpu.get_cpu_capability()
    off = forced_off()
    supported, why = {}, {}
    mkldnn = torch.backends.mkldnn.is_available()

    def decide(feature: str, problem: str | None) -> None:
        if feature in off:
            problem = f"turned off by {FORCE_ENV}"
        supported[feature] = problem is None
        if problem is not None:
            why[feature] = problem

    no_onednn = "this torch is built without oneDNN"
    decide("packed_float32", _packed_linear_works(torch.float32) if mkldnn else no_onednn)
    for feature, dtype, routes in (
        ("bfloat16", torch.bfloat16, "AVX512-BW/VL/DQ, AVX512-BF16, AMX or AVX-NE-CONVERT"),
        ("float16", torch.float16, "AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT"),
    ):
        problem = None if mkldnn else no_onednn
        if problem is None and not _half_products_native(dtype):
            problem = f"oneDNN has no {feature} kernels for this CPU"
        if problem is None:
            problem = _packed_linear_works(dtype)
        if problem is not None:
            needs = routes if arch in ("x86_64", "AMD64") else f"a CPU with {feature} instructions"
            problem += f" (needs {needs}; this CPU lists {' '.join(flags) or 'none of the relevant flags'})"
            if caps:
                problem += f"; the environment caps the ISA: {' '.join(f'{k}={v}' for k, v in caps.items())}"
        decide(feature, problem)
    return CpuCapabilities(name, arch, flags, aten, caps, supported, why)


def packing_feature(dtype: torch.dtype) -> str | None:
    """The feature that packing weights of this dtype needs (None: no packed path for it)."""
    return {torch.float32: "packed_float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)


def packing_problem(dtype: torch.dtype) -> str | None:
    """Why weights of this dtype cannot be packed for oneDNN here; None when they can."""
    feature = packing_feature(dtype)
    if feature is None:
        return f"no packed products for {dtype}"
    caps = probe()
    return None if caps.has(feature) else caps.missing(feature)
