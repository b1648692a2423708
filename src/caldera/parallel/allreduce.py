"""Synchronous data parallel: every rank computes gradients on its shard; buckets are all-reduced while
backward still runs; every rank applies the same averaged update.

Order of events in one step (on every rank):
1. ``backward(loss)``: autograd accumulates into bucket views; a hook counts each parameter's gradient, and
   when a bucket is complete its non-blocking all-reduce starts at once (the last layers finish first, so their
   buckets travel while earlier layers are still differentiated). Each hook also tests pending requests, which
   is what makes MPI progress a non-blocking collective without a progress thread.
2. ``step()``: start any bucket that never completed (unused parameters keep zeros), wait for all, step the
   optimizer, zero the buckets.
The loss is divided by the number of ranks before backward, so the reduced sum is already the average.
"""

from __future__ import annotations

from typing import Any

import torch

from caldera.comm.buckets import Bucket, build_buckets, rebind_grads
from caldera.parallel.base import register
from caldera.world import World


@register("allreduce")
class AllReduce:
    """Data parallel with bucketed, backward-overlapped gradient all-reduce over the world communicator."""

    def __init__(
        self,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        overlap: bool = True,
        grad_clip: float | None = None,
        **_: Any,
    ) -> None:
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.first_bucket_bytes = int(min(first_bucket_mb, bucket_mb) * 2**20)
        self.overlap, self.grad_clip = overlap, grad_clip
        self.buckets: list[Bucket] = []
        self._hooks: list[Any] = []

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Broadcast rank 0's weights and buffers, build the buckets and install the gradient hooks."""
        self.model, self.optimizer, self.world, self.comm = model, optimizer, world, world.comm
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                self.comm.Bcast(t.data if t.is_contiguous() else t.data.contiguous(), root=0)
        # Gradients arrive roughly in reverse order of definition: bucket them that way.
        params = [p for p in reversed(list(model.parameters())) if p.requires_grad]
        self.buckets = build_buckets(params, self.bucket_bytes, self.first_bucket_bytes)
        owner = {id(p): b for b in self.buckets for p in b.params}
        if self.overlap and self.world.size > 1:
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(owner[id(p)])))
        return model

    def _make_hook(self, bucket: Bucket):
        def hook(_: torch.Tensor) -> None:
            bucket.pending -= 1
            if bucket.pending == 0:
                bucket.handle = self.comm.Iallreduce(bucket.flat)
            for b in self.buckets:  # drive MPI progress of the buckets already in flight
                if b.handle is not None and b is not bucket:
                    b.handle.test()

        return hook

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss / ranks``; full buckets start reducing during this call."""
        (loss / self.world.size if self.world.size > 1 else loss).backward()

    def step(self) -> None:
        """Finish every bucket's all-reduce, then update the weights and zero the buckets."""
        if self.world.size > 1:
            for b in self.buckets:
                if b.handle is None:
                    b.handle = self.comm.Iallreduce(b.flat)
            for b in self.buckets:
                b.handle.wait()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        for b in self.buckets:
            rebind_grads(b)  # an optimizer or user code may have replaced a .grad: keep the views
            b.reset()

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond the model and optimizer: data-parallel state is the same on every rank."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        """Remove the hooks and give the gradients back as ordinary tensors."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for b in self.buckets:
            for p in b.params:
                p.grad = None
        self.buckets = []
