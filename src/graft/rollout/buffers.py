"""A KV-cache tensor that grows in place: the one reserved-buffer cache both rollout forwards use (the
transformers model's, through graft.rollout.sampler.ReservedLayer, and graft's decoder's KVBuffers)."""

from __future__ import annotations

import torch


class ReservedBuffer:
    """Keys or values along a time dimension, written into room reserved ahead: an append is an in-place
    write (transformers' dynamic cache concatenates, copying the whole cache every decode step); past the
    reservation the room doubles, so a longer sequence costs amortised O(1) copies per position. Rows
    along the batch dimension can be repeated (a group sharing its prompt) or selected (completions that
    finished leave)."""

    def __init__(self, first: torch.Tensor, time_dim: int, batch_dim: int, capacity: int = 0):
        self.t, self.b = time_dim, batch_dim
        self.length = first.shape[time_dim]
        shape = list(first.shape)
        shape[time_dim] = max(capacity, self.length)
        self.data = first.new_empty(shape)
        self.data.narrow(time_dim, 0, self.length).copy_(first)

    @property
    def filled(self) -> torch.Tensor:
        """The written part, a view of the buffer."""
        return self.data.narrow(self.t, 0, self.length)

    @property
    def capacity(self) -> int:
        return self.data.shape[self.t]

    def reserve(self, capacity: int) -> None:
        """Room for `capacity` positions, so the appends up to there write in place."""
        if capacity > self.capacity:
            shape = list(self.data.shape)
            shape[self.t] = capacity
            data = self.data.new_empty(shape)
            data.narrow(self.t, 0, self.length).copy_(self.filled)
            self.data = data

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Write `x` (the buffer's layout, any number of positions) after the filled part; the filled part."""
        end = self.length + x.shape[self.t]
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity))
        self.data.narrow(self.t, self.length, end - self.length).copy_(x)
        self.length = end
        return self.filled

    def repeat_rows(self, repeats) -> None:
        """Each row `repeats` times in place of once (an int, or a tensor of counts per row)."""
        self.data = self.data.repeat_interleave(repeats, dim=self.b)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows`, in that order."""
        self.data = self.data.index_select(self.b, rows.to(self.data.device))
