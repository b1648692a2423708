"""Flat gradient buckets: many small gradients packed into a few large contiguous buffers.

One all-reduce of 25 MB costs far less than a thousand all-reduces of 25 kB (latency dominates small messages),
so gradients are reduced bucket by bucket. Each parameter's ``.grad`` is a *view* into its bucket: autograd
accumulates straight into the buffer that MPI reduces, and no gradient is ever copied.

Every gradient starts on a 64-byte boundary (its slice is padded): a GEMM writing into a view 16 bytes off a cache
line runs 15-30 % slower on AVX-512 (measured on the development machine), and the padding costs < 16 numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from caldera.comm.base import Handle

ALIGN_BYTES = 64


def padded(numel: int, element_size: int = 4) -> int:
    """``numel`` rounded up so that the next slice again starts on a 64-byte boundary."""
    step = max(1, ALIGN_BYTES // element_size)
    return -(-numel // step) * step


def storage_size(params: Sequence[torch.nn.Parameter]) -> int:
    """Numbers a flat storage needs to hold the (padded) gradients of ``params`` back to back."""
    return sum(padded(p.numel(), p.element_size()) for p in params if p.requires_grad)


@dataclass
class Bucket:
    """A contiguous buffer backing the gradients of ``params`` (all of one dtype and device)."""

    params: list[torch.nn.Parameter]
    flat: torch.Tensor
    pending: int = 0
    handle: Handle | None = None
    index: int = 0
    offsets: list[int] = field(default_factory=list)
    start: int = 0  # where ``flat`` begins in the shared storage it was carved from (if any)

    def reset(self) -> None:
        """Zero the gradients and re-arm the readiness count for the next backward pass."""
        self.flat.zero_()
        self.pending = len(self.params)
        self.handle = None


def build_buckets(
    params: Sequence[torch.nn.Parameter],
    bucket_bytes: int,
    first_bucket_bytes: int | None = None,
    storage: torch.Tensor | None = None,
) -> list[Bucket]:
    """Group ``params`` (in the order their gradients are expected) into buckets of about ``bucket_bytes``.

    The first bucket is smaller (``first_bucket_bytes``) so that communication can start early in backward.
    With ``storage`` (a flat tensor of at least the total size, e.g. shared memory) the buckets are carved out
    of it back to back instead of allocated.
    """
    buckets: list[Bucket] = []
    current: list[torch.nn.Parameter] = []
    size = 0
    limit = first_bucket_bytes or bucket_bytes
    for p in params:
        if not p.requires_grad:
            continue
        if current and (p.dtype != current[0].dtype or p.device != current[0].device or size >= limit):
            buckets.append(_make(current, len(buckets), storage, _end(buckets)))
            current, size, limit = [], 0, bucket_bytes
        current.append(p)
        size += padded(p.numel(), p.element_size()) * p.element_size()
    if current:
        buckets.append(_make(current, len(buckets), storage, _end(buckets)))
    return buckets


def _end(buckets: list[Bucket]) -> int:
    return buckets[-1].start + buckets[-1].flat.numel() if buckets else 0


def _make(params: list[torch.nn.Parameter], index: int, storage: torch.Tensor | None, start: int) -> Bucket:
    total = sum(padded(p.numel(), p.element_size()) for p in params)
    if storage is not None:
        flat = storage[start : start + total]
        flat.zero_()
    else:
        flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    offsets, offset = [], 0
    for p in params:
        offsets.append(offset)
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += padded(p.numel(), p.element_size())
    return Bucket(params=params, flat=flat, pending=len(params), index=index, offsets=offsets, start=start)


def point_grads(bucket: Bucket, source: torch.Tensor) -> None:
    """Make each parameter's ``.grad`` a view of its slice of ``source`` (laid out like ``bucket.flat``)."""
    for p, offset in zip(bucket.params, bucket.offsets):
        p.grad = source[offset : offset + p.numel()].view_as(p)


def rebind_grads(bucket: Bucket) -> None:
    """Point each parameter's ``.grad`` back at its slice of the bucket (after someone replaced it)."""
    for p, offset in zip(bucket.params, bucket.offsets):
        view = bucket.flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None or p.grad.data_ptr() != view.data_ptr():
            if p.grad is not None:
                view.add_(p.grad)
            p.grad = view


def flatten(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``tensors`` into one flat fp32 CPU vector (``out`` when given)."""
    total = sum(t.numel() for t in tensors)
    out = torch.empty(total, dtype=torch.float32) if out is None else out
    offset = 0
    for t in tensors:
        out[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
        offset += t.numel()
    return out


@torch.no_grad()
def unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the flat vector back into ``tensors``."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_over_ranks(
    comm, size: int, tensors: list[torch.Tensor], flat: torch.Tensor | None = None
) -> torch.Tensor:
    """Average ``tensors`` over the ranks in place with one all-reduce; return the flat buffer (pass it back in
    as ``flat`` to reuse it). fp64 if any tensor is fp64, else fp32 (bf16 tensors are averaged in fp32)."""
    total = sum(t.numel() for t in tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if flat is None or flat.numel() != total or flat.dtype != dtype:
        flat = torch.empty(total, dtype=dtype, device=tensors[0].device)
    with torch.no_grad():
        flatten(tensors, out=flat)
        comm.Allreduce(flat)
        flat.div_(size)
        unflatten(flat, tensors)
    return flat
