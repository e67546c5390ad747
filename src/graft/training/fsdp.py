"""Full fine-tuning sharded over the processes (train.fsdp): torch's FSDP2 (`fully_shard`) holds 1/N of the
weights, gradients and AdamW moments on each of N ranks, for models whose full fine-tuning state does not
fit one device. Everything collective lives here; the loop and the step call these few functions.

- The update runs under FSDP: each decoder layer's weights are all-gathered for its forward and backward and
  the gradients reduce-scattered, summed (divide factor 1) like the replicated path's all-reduce, because the
  loss normalisers already count the whole step (graft.training.distributed).
- Rollouts, evaluation and the gate use the full weights (`full_weights`): every rank gathers them once,
  samples or evaluates locally without a collective per token, and frees them again. Memory there is one
  full copy of the weights per rank, still without gradients or optimizer state.
- Checkpoints hold full (unsharded) state dicts in the single-process layout, the optimizer's keyed by
  parameter name: any number of processes can resume them, and transformers loads the weights as they are.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from graft.training.distributed import Ranks

# gathered to the main rank, moved to its CPU (the checkpoint's writer); the other ranks get empty dicts
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# every rank reads the checkpoint's full tensors and keeps its own shards of them
_SCATTER = StateDictOptions(full_state_dict=True)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (decoder layers of transformers' causal LMs)."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in no_split]
    if not blocks:
        raise ValueError(
            f"train.fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules), so graft "
            "cannot tell which blocks to shard; train it with train.fsdp=false"
        )
    return blocks


def shard(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """Shard `model` in place over every rank: one FSDP unit per decoder layer, the rest (embeddings, final
    norm, head: a tied head and its embedding are one weight) in the outermost unit. Gradients are summed,
    not averaged. FSDP gathers and frees a unit's weights around its forward only, so code that reaches
    into the model (the update's body-then-head pass) runs through `as_forward`."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._graft_forward = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "_graft_forward")
    for unit in _units(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    return model


def _call(model, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def as_forward(model: torch.nn.Module, fn: Callable) -> Callable:
    """`fn` itself, or for a sharded model `fn` run as the model's forward: FSDP gathers the outermost
    unit's weights (embeddings, norm, head) before it and sums their gradients after backward, as it does
    around model(...); the decoder layers' own forwards gather theirs."""
    return functools.partial(model._graft_forward, fn) if is_sharded(model) else fn


def is_sharded(model: torch.nn.Module | None) -> bool:
    return model is not None and bool(_units(model))


def _units(model: torch.nn.Module) -> list[FSDPModule]:
    """The model's FSDP units, outermost first."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(*models: torch.nn.Module | None) -> Iterator[None]:
    """Inside: every sharded model in `models` holds its full weights on this rank, so forwards need no
    collective (a rollout, or an evaluation on the main rank alone). Every rank enters and leaves the
    outermost one together (gathering and freeing are collectives); nested ones change nothing. Models
    that are not sharded pass through."""
    sharded = [m for m in models if is_sharded(m) and not getattr(m, "_graft_gathered", False)]
    for model in sharded:
        model._graft_gathered = True
        for unit in _units(model):
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for model in sharded:
            units = _units(model)
            for unit in units:
                # FSDP's own rule: the outermost unit stays gathered from forward to backward, layers not
                unit.set_reshard_after_forward(unit is not units[0], recurse=False)
                unit.reshard()
            model._graft_gathered = False


def gathered_state(model, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state keyed by parameter name), full, on the main rank's CPU; empty dicts
    elsewhere. A collective: every rank calls it."""
    return gathered_model_state(model), get_optimizer_state_dict(model, optimizer, options=_GATHER)


def gathered_model_state(model) -> dict:
    """The full model state on the main rank's CPU (empty elsewhere), a tied weight once, under its first
    name, as save_pretrained writes it; every rank calls it."""
    state = get_model_state_dict(model, options=_GATHER)
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict | None):
    """Load full (checkpoint) state dicts into a sharded model and its optimizer: each rank keeps its
    shards. Returns (missing, unexpected) weight names, as load_state_dict(strict=False) does."""
    keys = set_model_state_dict(
        model, model_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_SCATTER)
    return keys.missing_keys, keys.unexpected_keys
