"""The copy of the policy that the rollout samples from, refreshed before each rollout with the policy's
current (LoRA-merged) weights. What it is made of is graft.cpu.plan's decision, passed in; the one thing
it checks itself is the probe's answer for packing its dtype (so library callers cannot crash a CPU)."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch

from graft.cpu.decoder import Decoder, decoder_problem
from graft.cpu.packed import PackedLinear
from graft.cpu.probe import packing_problem
from graft.models import ModelError, merged_state, merged_weight


class SamplingCopy:
    """Two reasons to sample from a copy instead of the policy itself:
    - the CPU fast path (pack=True, own_decoder): Llama-shaped models sample through graft's own forward
      (graft.cpu.decoder) on weights packed for oneDNN (or on F.linear where this CPU cannot pack them),
      which between rollouts keeps only what no update changes (under LoRA: the LM head); other models
      keep a whole copy of the transformers modules with each nn.Linear swapped for a PackedLinear;
    - dtype=bfloat16: half the bytes per decode step while training keeps its precision; the samples then
      come from the policy rounded to bfloat16, the trade of sampling with a bf16 inference engine.
    """

    def __init__(self, policy, dtype: torch.dtype, pack: bool = False, own_decoder: bool | None = None):
        """`pack`: products on oneDNN-packed weights where the probe says this CPU packs `dtype` (else
        F.linear, `unpacked_because` says why); `own_decoder`: graft's decoder, which the plan has checked
        the model fits (None, for library callers: with `pack`, where the model fits)."""
        from peft import PeftModel

        plain = policy.get_base_model() if isinstance(policy, PeftModel) else policy
        if own_decoder is None:
            own_decoder = pack and decoder_problem(plain) is None
        # the probe's answer, which the plan already followed; a library caller gets the same fallback
        self.unpacked_because = packing_problem(dtype) if pack else None
        if self.unpacked_because is not None:
            warnings.warn(f"sampling from unpacked {dtype} weights: {self.unpacked_because}", stacklevel=2)
            pack = False
        self.dtype = dtype
        self.is_peft = isinstance(policy, PeftModel)
        self.packed: set[str] = set()  # module paths whose weights live in oneDNN's layout
        self.adapted: set[str] | None = None  # weights each refresh changes (None: all)
        with torch.no_grad():
            try:
                if own_decoder:
                    problem = decoder_problem(plain)
                    if problem is not None:  # the plan checks this first (graft.cpu.plan)
                        raise ValueError(f"graft's decoder cannot run this model: {problem}")
                    self.model = Decoder(plain, merged_state(policy)[0], dtype, pack=pack)
                    return
                model = copy.deepcopy(policy)
                model = model.merge_and_unload() if self.is_peft else model
                self.model = model.to(dtype).eval().requires_grad_(False)
                if pack:
                    self._pack(self.model, "")
            except (AttributeError, RuntimeError, NotImplementedError) as exc:  # a kernel the probe missed
                if not pack:
                    raise
                raise ModelError(
                    f"generation.pack_weights: this torch cannot pack weights ({exc}); "
                    "set generation.pack_weights=false"
                ) from exc

    @contextlib.contextmanager
    def sampling(self, policy, recording=None):
        """The copy with the policy's current weights, for one rollout; with a `recording`
        (graft.cpu.decoder.Recording, graft's decoder only) its forward calls are kept in it. Afterwards
        graft's decoder drops the packed weights that the next refresh rebuilds anyway (the adapted layers),
        so the training pass reuses that memory instead of adding to it."""
        model = self.refresh(policy)
        decoder = isinstance(model, Decoder)
        if recording is not None and not decoder:
            raise ValueError("only graft's own decoder records its forward (see graft.cpu.replay)")
        if recording is not None:
            model.recording = recording
        try:
            yield model
        finally:
            if decoder:
                model.recording = None
                model.release(self.adapted)

    def _pack(self, module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if type(child) is torch.nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias, self.dtype))
                self.packed.add(prefix + name)
            else:
                self._pack(child, f"{prefix}{name}.")

    def _set_weight(self, path: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        target = self.model.get_submodule(path)
        if path in self.packed:
            target.pack(weight, bias)
        else:
            target.weight.copy_(weight)

    def refresh(self, policy):
        """Copy the policy's current weights in (only the LoRA-adapted layers change under LoRA)."""
        from peft.tuners.lora import LoraLayer

        if isinstance(self.model, Decoder):  # re-fuse and re-pack what changed
            with torch.no_grad():
                state, self.adapted = merged_state(policy)
                self.model.load(state, self.adapted)
            return self.model
        with torch.no_grad():
            if not self.is_peft:  # full fine-tuning: everything may have moved (a tied head included)
                for path, module in policy.named_modules():
                    if path in self.packed:
                        self._set_weight(path, module.weight, module.bias)
                for name, param in policy.named_parameters():
                    if name.rpartition(".")[0] not in self.packed:
                        self.model.get_parameter(name).copy_(param)
                return self.model
            prefix = "base_model.model."
            for name, layer in policy.named_modules():
                if isinstance(layer, LoraLayer) and name.startswith(prefix):
                    self._set_weight(name[len(prefix) :], merged_weight(layer))
        return self.model
