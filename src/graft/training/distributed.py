"""Data-parallel GRPO on torch.distributed: N processes (ranks), launched by torchrun (`graft train --nproc N`
starts it), each sampling, scoring and training on its share of a step's groups.

Each rank takes a contiguous share of the step's problems, so a group (G completions of one problem) lives
whole on one rank and rank-ordered shares are the single-process batch. Rewards are gathered before the
advantages, which then equal the single process's for every grpo.scale_rewards (including "batch", whose
std spans all groups). Loss normalisers count the whole step across ranks and gradients are summed, so N
ranks x B/N completions give the gradient of 1 process x B (tests/training/test_distributed.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes; a single process is Ranks() and every collective
    below is then the identity."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that prints, writes the run directory, evaluates and checkpoints."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous share of `items` (len divisible by world, checked by graft validate)."""
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def share_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B / world, ...) this rank's rows of a (B, ...) tensor laid out as `gather_rows` builds it."""
        n = x.shape[0] // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(world * b, ...) every rank's (b, ...) tensor, in rank order (same b on every rank)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def sum(self, value: float | int) -> float:
        """The sum over ranks of a number."""
        if self.world == 1:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item()

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes (a stop request reaches every rank at its next step end)."""
        return self.sum(int(bool(flag))) > 0 if self.world > 1 else flag

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Add every rank's .grad into every rank's, in one flat buffer (LoRA factors: a few MB). A rank
        whose parameter got no gradient contributes zeros, so each rank joins the same collective."""
        params = [p for p in params if not isinstance(p, DTensor)]  # FSDP's backward has summed those
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main rank's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @property
    def device(self) -> torch.device:
        """Where this backend's collectives put their tensors (NCCL: the rank's GPU; gloo: the CPU)."""
        if self.world > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE = Ranks()


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a possibly sharded one (under FSDP, clip_grad_norm_ returns the norm as one)."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def launched_world() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(device: str) -> tuple[Ranks, bool]:
    """(this process's ranks, whether this call made the process group). Joins the group the launcher
    set up (env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) with NCCL for CUDA
    and gloo otherwise, unless the caller (accelerate, a notebook) made one; one process gets SINGLE."""
    if launched_world() == 1:
        return SINGLE, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    made = not dist.is_initialized()
    if made:
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), made


def rank_device(device: str, ranks: Ranks) -> str:
    """model.device for this rank: its own GPU (cuda:LOCAL_RANK) where the run uses GPUs."""
    if ranks.world > 1 and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{ranks.local_rank}"
    return device


def reduce_metrics(ranks: Ranks, metrics: dict) -> dict:
    """One step's metrics for the whole run: throughput and counts summed over ranks, everything else the
    mean of the ranks' values (ranks hold equal numbers of completions, so a mean of means is the mean)."""
    if ranks.world == 1:
        return metrics
    rows = ranks.gather_objects(metrics)
    summed = ("tokens_per_s",)  # nonfinite_skipped is the same on every rank: the loss is summed first
    out = {}
    for key, value in metrics.items():
        values = [row.get(key) for row in rows]
        if isinstance(value, bool) or not all(isinstance(v, int | float) for v in values):
            out[key] = value
        elif key.startswith("time/"):
            out[key] = max(values)  # the step waits for its slowest rank
        else:
            out[key] = (
                sum(values) if key in summed or key.startswith("sampling/") else sum(values) / len(values)
            )
    return out
