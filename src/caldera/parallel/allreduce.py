"""Synchronous data parallel: every rank computes gradients on its shard; buckets are reduced while backward
still runs; every rank applies the same averaged update.

Order of events in one step (on every rank):
1. ``backward(loss)``: autograd accumulates into bucket views; a hook counts each parameter's gradient, and
   when a bucket is complete its reduction starts at once (the last layers finish first, so their buckets are
   reduced while earlier layers are still differentiated).
2. ``step()``: reduce any bucket that never completed (unused parameters keep zeros), wait for all, step the
   optimizer, zero the buckets.
The loss is divided by the number of ranks before backward, so the reduced sum is already the average.

Two reducers move the bytes. ``mpi``: a non-blocking ``Iallreduce`` per bucket (the hooks test pending
requests, which is what makes MPI progress without a progress thread); it serves GPUs (CUDA-aware MPI or
NCCL) and any layout. ``shm``: on CPU ranks sharing nodes, buckets live in an MPI shared-memory window and
each rank sums its share of every bucket straight out of its neighbours' memory (see ``comm/shm.py``), with
MPI between nodes. ``auto`` picks ``shm`` for fp32 CPU training with several ranks per node.

``grad_comm = "bf16" | "fp16"`` halves the bytes: each rank's gradients still accumulate in fp32, are rounded to
16 bits when their bucket completes, and are summed in fp32 (``comm/lowp.py``; with ``shm`` the window's slots
are 16-bit and the result row fp32). The optimizer gets fp32 gradients, bit-identical on every rank.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from caldera.comm.buckets import (
    Bucket,
    average_over_ranks,
    build_buckets,
    point_grads,
    rebind_grads,
    storage_size,
)
from caldera.comm.linear_grads import fuse
from caldera.comm.lowp import LowPrecisionSum, SumJob, wire_dtype
from caldera.config import StrategyOptions
from caldera.errors import ConfigError
from caldera.models.materialize import materialize, on_meta
from caldera.parallel.base import Purpose, Strategy, clip_and_measure, register
from caldera.parallel.fsdp import ParamShards
from caldera.parallel.zero import ShardedOptimizer
from caldera.world import World

_POOL = 3  # gradient bucket buffers kept between steps (the buckets in flight at once, typically)


class AllReduceOptions(StrategyOptions):
    """``[parallel]`` keys of strategy ``allreduce``."""

    bucket_mb: float = Field(25.0, gt=0, description="gradient bucket size in MiB (one reduction each)")
    overlap: bool = Field(True, description="reduce buckets while backward still runs")
    reducer: Literal["auto", "mpi", "shm"] = Field("auto", description="how allreduce moves gradients")
    grad_comm: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype gradients travel in (bf16/fp16 halve the bytes; sums stay fp32)"
    )
    shard_optimizer: bool = Field(
        False, description="each rank keeps and steps 1/N of the optimizer state (ZeRO-1)"
    )
    shard_gradients: bool = Field(
        False, description="with shard_optimizer: gradients are reduce-scattered, each rank keeps only the 1/N "
        "its optimizer range steps (ZeRO-2)",
    )  # fmt: skip
    shard_params: bool = Field(
        False, description="with shard_gradients: each rank keeps only 1/N of the parameters too, each block "
        "gathered just before it runs and freed after (ZeRO-3); the model is built without storage and never whole",
    )  # fmt: skip
    fused_linear_grads: bool = Field(
        True, description="nn.Linear weight gradients are added into the gradient buckets by their own GEMM (no "
        "temporary); false: PyTorch's own accumulation",
    )  # fmt: skip


@register("allreduce")
class AllReduce(Strategy):
    """Data parallel with bucketed, backward-overlapped gradient reduction over the world communicator."""

    Options = AllReduceOptions

    def __init__(
        self,
        *,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        overlap: bool = True,
        grad_clip: float | None = None,
        reducer: str = "auto",
        grad_comm: str = "fp32",
        shard_optimizer: bool = False,
        shard_gradients: bool = False,
        shard_params: bool = False,
        fused_linear_grads: bool = True,
    ) -> None:
        if reducer not in ("auto", "mpi", "shm"):
            raise ValueError(f"unknown reducer {reducer!r}; use 'auto', 'mpi' or 'shm'")
        self.grad_comm, self.wire = grad_comm, wire_dtype(grad_comm)  # wire: None = the gradients' own dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.first_bucket_bytes = int(min(first_bucket_mb, bucket_mb) * 2**20)
        self.overlap, self.grad_clip, self.reducer_name = overlap, grad_clip, reducer
        self.buckets: list[Bucket] = []
        self.node = None  # the NodeReducer when reducing through shared memory
        self.reducer = "none"  # which reducer setup() chose: "mpi" or "shm" ("none" on one rank)
        self.lowp: LowPrecisionSum | None = None  # the mpi reducer's 16-bit sums (grad_comm bf16/fp16)
        self._jobs: list[SumJob] = []  # one per bucket, by bucket index
        self._hooks: list[Any] = []
        self._in_backward = False
        self._sync = True  # False inside no_sync(): gradients accumulate without being reduced
        self.reductions = 0  # bucket reductions started so far (one per bucket per optimizer step)
        self.shard_optimizer = shard_optimizer
        self.shards: ShardedOptimizer | None = None  # this rank's part of the optimizer (shard_optimizer)
        if shard_gradients and (not shard_optimizer or grad_comm != "fp32"):
            raise ValueError("shard_gradients needs shard_optimizer = true and grad_comm = 'fp32'")
        self.shard_gradients = shard_gradients
        if shard_params and not shard_gradients:
            raise ValueError("shard_params needs shard_gradients = true and shard_optimizer = true")
        # ZeRO-3 (``parallel/fsdp.py``): the model arrives without storage; this rank materialises its range only.
        self.shard_params = self.builds_on_meta = shard_params
        self.zero3: ParamShards | None = None
        self._pool: list[
            torch.Tensor
        ] = []  # bucket storage kept between steps (ZeRO-2/3), at most _POOL buffers
        # ZeRO-2: bucket storage exists only from a bucket's first gradient to the end of its reduce-scatter;
        # what stays is this rank's range of the summed gradients (``_grad_shard``).
        self._grad_shard: torch.Tensor | None = None
        self.fused_linear_grads = fused_linear_grads  # linear layers' weight GEMMs add into the buckets
        self._unfuse = lambda: None

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Broadcast rank 0's weights and buffers, build the buckets and install the gradient hooks."""
        self.model, self.optimizer, self.world, self.comm = model, optimizer, world, world.comm
        if self.shard_params:
            if world.size > 1:
                return self._setup_zero3(model, optimizer)
            if on_meta(model):  # one process: the plain model, whole
                materialize(model, None, world.device, optimizer)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                self.comm.Bcast(t.data if t.is_contiguous() else t.data.contiguous(), root=0)
        # Gradients arrive roughly in reverse order of definition: bucket them that way.
        params = [p for p in reversed(list(model.parameters())) if p.requires_grad]
        storage = None
        if self._use_shm(params):
            from caldera.comm.shm import NodeReducer

            total = storage_size(params)
            self.node = NodeReducer(self.comm.comm, total, self.wire)
            # fp32 slots are the gradients; 16-bit slots only receive rounded copies of a private fp32 buffer.
            storage = self.node.slot if self.wire is None else torch.zeros(total)
        self.reducer = "none" if self.world.size == 1 else ("shm" if self.node is not None else "mpi")
        self.buckets = build_buckets(params, self.bucket_bytes, self.first_bucket_bytes, storage)
        self.n_buckets = len(self.buckets)
        if self.reducer == "mpi" and self.wire is not None:
            self.lowp = LowPrecisionSum(self.comm, self.wire)
            self._jobs = [self.lowp.job(b.flat) for b in self.buckets]
        if self.shard_optimizer and self.world.size > 1:
            self._shard(params)
        if self.shard_gradients and self.world.size > 1:
            self._shard_grads()
        if self.overlap and self.world.size > 1:
            for b in self.buckets:
                for p in b.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b)))
        # A compiled module's backward is traced once, so the fused path's per-call choice (and its in-place
        # addmm_ into .grad) cannot live in it: compiled layers keep PyTorch's own gradient accumulation.
        # ZeRO-2's buckets come and go each step, so there is no standing storage for the fused GEMMs to add into.
        if self.fused_linear_grads and self.world.size > 1 and not self.compiled and self._grad_shard is None:
            self._unfuse = fuse(model, lambda: self._in_backward)
        return model

    def _setup_zero3(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """ZeRO-3: materialise this rank's range of the parameters; one gradient bucket per unit; hooks."""
        if self.compiled or not hasattr(self.comm, "Iallgatherv") or self.world.device.type != "cpu":
            raise ConfigError("[parallel] shard_params gathers blocks through MPI on CPU ranks, eagerly: start the "
                              "ranks with `caldera launch` or mpiexec on CPU, without [train] compile")  # fmt: skip
        self.zero3 = zero3 = ParamShards(model, optimizer, self.world)
        self.reducer = "mpi"
        self.buckets = zero3.buckets()
        self.n_buckets = len(self.buckets)
        self._shard_comm = self.comm
        self.shards = ShardedOptimizer(self.optimizer, zero3.layout(), self.world.rank, self.world.size,
                                       local=zero3.local)  # fmt: skip
        self._shard_grads([zero3_unit.end - zero3_unit.start for zero3_unit in zero3.units])
        for b in self.buckets:  # reduce-scatter a unit's gradients as soon as they are all in
            for p in b.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b)))
        zero3.install()
        return model

    def _shard(self, params: list[torch.nn.Parameter]) -> None:
        """Give this rank its range of the optimizer (ZeRO-1, ``parallel/zero.py``)."""
        from caldera.parallel.zero import ShardedOptimizer

        layout = [(p, b.start + off) for b in self.buckets for p, off in zip(b.params, b.offsets)]
        if self.node is not None:
            # The node's ranks share the gradient sums and pass parameters through the same window, so the state
            # is cut over the node (every node steps the whole model, 1/L of it per rank).
            from caldera.comm.mpi import MPIComm

            self._shard_comm = MPIComm(self.node.node)
            self.shards = ShardedOptimizer(self.optimizer, layout, self.node.local_rank, self.node.local_size)
        else:
            self._shard_comm = self.comm
            self.shards = ShardedOptimizer(self.optimizer, layout, self.world.rank, self.world.size)
            if self.shard_gradients:  # ZeRO-2 gathers through a bucket-sized buffer (_gather_in_pieces)
                return
            self._flat = torch.empty(self.shards.chunk * self.world.size, dtype=params[0].dtype,
                                     device=params[0].device)  # fmt: skip

    def _shard_grads(self, numel: list[int] | None = None) -> None:
        """ZeRO-2: drop the buckets' storage until gradients arrive; keep this rank's range of their sums.
        ``numel``: each bucket's length (ZeRO-3's buckets come without storage)."""
        if not hasattr(self.comm, "Ireduce_scatter") or self.world.device.type != "cpu":
            raise ConfigError(
                "[parallel] shard_gradients reduce-scatters uneven ranges through MPI on CPU tensors: start the "
                "ranks with `caldera launch` or mpiexec on CPU, or set shard_gradients = false"
            )
        shards = self.shards
        if shards.scaler is not None:
            raise ValueError("shard_gradients does not combine with fp16-mixed yet (its loss scaler reads whole "
                             "gradients): use bf16-mixed or fp32, or shard_gradients = false")  # fmt: skip
        self._grad_shard = torch.zeros(shards.hi - shards.lo, dtype=shards.dtype)
        ranges = [(min(r * shards.chunk, shards.total), min((r + 1) * shards.chunk, shards.total))
                  for r in range(shards.size)]  # fmt: skip
        # Per bucket: how many of its numbers each rank receives, and where this rank's land in its range.
        self._scatter: list[tuple[int, list[int], torch.Tensor]] = []
        self._numel: list[int] = []  # each bucket's length while it exists
        for b in self.buckets:
            n = b.flat.numel() if numel is None else numel[b.index]
            counts = [max(0, min(hi, b.start + n) - max(lo, b.start)) for lo, hi in ranges]
            at = max(shards.lo, b.start) - shards.lo
            self._scatter.append((sum(counts), counts, self._grad_shard[at : at + counts[shards.rank]]))
            self._numel.append(n)
            self._release(b)
            for p in b.params:  # runs before the gradient is accumulated: give the bucket its storage first
                self._hooks.append(p.register_hook(self._make_alloc_hook(b)))

    def _make_alloc_hook(self, bucket: Bucket):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if bucket.flat.numel() == 0:
                self._allocate(bucket)
            return grad

        return hook

    def _allocate(self, bucket: Bucket) -> None:
        # Storage comes from a few buffers kept between steps: allocating (and faulting in) fresh pages for
        # every bucket of every step made ZeRO-2 slow.
        n = self._numel[bucket.index]
        buffer = self._pool.pop() if self._pool else None
        if buffer is None or buffer.numel() < n:
            buffer = torch.empty(max(self._numel), dtype=self._grad_shard.dtype)
        bucket.flat = buffer[:n].zero_()
        point_grads(bucket, bucket.flat)

    def _release(self, bucket: Bucket) -> None:
        """ZeRO-2: the bucket's sums are in this rank's range: free its whole gradients."""
        for p in bucket.params:
            p.grad = None
        buffer = bucket.flat._base if bucket.flat._base is not None else bucket.flat
        if len(self._pool) < _POOL and buffer.numel():
            self._pool.append(buffer)
        bucket.flat = bucket.flat.new_empty(0)

    def _gather_params(self) -> None:
        """After each rank stepped its range: every rank takes the whole updated model."""
        if self.node is not None:
            # The result row's gradients are spent: each rank leaves its updated range there for the others.
            self.shards.write_range(self.node.result)
            self.node.node.Barrier()
            self.shards.read_all(self.node.result)
            return
        if self._grad_shard is not None:
            self._gather_in_pieces()
            return
        chunk, rank = self.shards.chunk, self.world.rank
        self.shards.write_range(self._flat)
        self.comm.Allgather(self._flat[rank * chunk : (rank + 1) * chunk].clone(), self._flat)
        self.shards.read_all(self._flat)

    def _gather_in_pieces(self) -> None:
        """ZeRO-2: all-gather the updated ranges a slice of about one bucket at a time; a buffer of the whole model
        (ZeRO-1's) would cost again what sharding the gradients saved."""
        shards, size = self.shards, self.world.size
        mine = torch.empty(shards.chunk, dtype=shards.dtype)
        shards.write_range(mine, shards.rank * shards.chunk)
        step = max(1, min(shards.chunk, self.bucket_bytes // mine.element_size() // size))
        buffer = torch.empty(step * size, dtype=shards.dtype)
        for k in range(0, shards.chunk, step):
            n = min(step, shards.chunk - k)
            self.comm.Allgather(mine[k : k + n], buffer[: n * size])
            for r in range(size):
                if r != shards.rank:
                    shards.read_segment(r * shards.chunk + k, buffer[r * n : (r + 1) * n])

    def gather_state(self) -> None:
        """Assemble the whole optimizer state on rank 0 before a checkpoint (collective; sharded state only)."""
        if self.shards is not None:
            self.shards.gather_state(self._shard_comm, self._shard_comm.rank)

    def sharded_state(self) -> dict[str, Any] | None:
        """With ``shard_optimizer``: the optimizer's layout and this rank's range of its state, which this rank
        writes itself (collective); None otherwise. Under the node reducer every node holds the same ranges: only
        the ranks of the first node that holds each range write it."""
        if self.shards is None:
            return None
        layout = self.shards.shard_layout(self.zero3.names() if self.zero3 is not None else None)
        holders = self.comm.allgather(self.shards.rank)
        writer = [holders.index(shard) for shard in range(self.shards.size)]
        layout["files"] = [f"rank-{r:05d}.pt" for r in writer]
        mine = writer[self.shards.rank] == self.world.rank
        state = self.shards.local_state() if mine else None
        if state is not None and self.zero3 is not None:  # this rank's ranges of the parameters themselves
            state["params"] = [piece for *_, piece in self.shards.pieces]
        return {"layout": layout, "state": state}

    def _use_shm(self, params: list[torch.nn.Parameter]) -> bool:
        if self.reducer_name == "shm" and self.world.launcher == "torchrun":
            raise ConfigError(
                "reducer 'shm' sums through an MPI shared-memory window, but torchrun started these ranks: start "
                f"them with `caldera launch -n {self.world.size} -- ...` or mpiexec, or set reducer = 'auto'"
            )
        if self.world.size == 1 or self.reducer_name == "mpi" or not hasattr(self.comm, "comm"):
            return False
        if self.shard_gradients:  # the node's shared sums are whole gradients: nothing to shard
            if self.reducer_name == "shm":
                raise ConfigError("[parallel] shard_gradients needs reducer = 'mpi' or 'auto', not 'shm'")
            return False
        cpu_fp32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        from caldera.comm.shm import NodeReducer

        usable = cpu_fp32 and NodeReducer.usable(self.comm.comm)
        if self.reducer_name == "shm" and not usable:
            raise ValueError(
                "reducer 'shm' needs fp32 CPU parameters and the same number (>1) of ranks per node"
            )
        return usable

    def _make_hook(self, bucket: Bucket):
        def hook(_: torch.Tensor) -> None:
            if not self._sync:
                return
            bucket.pending -= 1
            if bucket.pending == 0:
                self._start(bucket)
            if self.lowp is not None:
                self.lowp.progress()  # drive MPI progress of the sums in flight
            elif self.node is not None:
                self.node.progress()  # the shares in flight between nodes
            else:
                for b in self.buckets:  # drive MPI progress of the buckets already in flight
                    if b.handle is None or b is bucket or not b.handle.test():
                        continue
                    if self._grad_shard is not None and b.flat.numel():
                        self._release(b)  # ZeRO-2: reduced; free its gradients while backward goes on

        return hook

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients (micro-batches); the next one outside reduces all."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _start(self, bucket: Bucket) -> None:
        self.reductions += 1
        if self.node is not None:
            source = bucket.flat if self.wire is not None else None
            self.node.reduce(bucket.start, bucket.start + bucket.flat.numel(), source, self._wire_scale())
            bucket.handle = _DONE
        elif self.lowp is not None:
            bucket.handle = self.lowp.start(self._jobs[bucket.index], self._wire_scale())
        elif self._grad_shard is not None:
            if bucket.flat.numel() == 0:  # no parameter of it had a gradient
                self._allocate(bucket)
            n, counts, mine = self._scatter[bucket.index]
            bucket.handle = self.comm.Ireduce_scatter(bucket.flat[:n], mine, counts)
        else:
            bucket.handle = self.comm.Iallreduce(bucket.flat)

    def _wire_scale(self) -> float:
        """What gradients are multiplied by on an fp16 wire: fp16-mixed's loss scale, else 1.

        The fp16-mixed policy unscales gradients as autograd produces them, so the buckets hold true gradients;
        rescaling them for the wire puts them back in the range the loss scale was tuned to keep inside fp16
        (small gradients would otherwise flush to zero). The scale is the same on every rank.
        """
        scaler = getattr(self.optimizer, "scaler", None)  # fp16-mixed's LossScaledOptimizer
        return float(scaler.scale) if self.wire == torch.float16 and scaler is not None else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss / ranks``; full buckets start reducing during this call."""
        self._in_backward = True
        if self.zero3 is not None:
            self.zero3.in_backward = True
        try:
            (loss / self.world.size if self.world.size > 1 else loss).backward()
        finally:
            self._in_backward = False
            if self.zero3 is not None:
                self.zero3.in_backward = False

    def step(self) -> None:
        """Finish every bucket's reduction, then update the weights and zero the buckets."""
        if self._grad_shard is not None:
            self._step_sharded()
            return
        if self.world.size > 1:
            for b in self.buckets:
                if b.handle is None:
                    self._start(b)
            for b in self.buckets:
                b.handle.wait()
            if self.node is not None:
                self.node.finish()
                # The optimizer reads the node-shared result in place (no copy back): it must not write into
                # .grad, which torch's optimizers never do; clipping goes through the reducer for that reason.
                for b in self.buckets:
                    point_grads(b, self.node.result[b.start : b.start + b.flat.numel()])
            if self.wire == torch.float16 and getattr(self.optimizer, "scaler", None) is None:
                self._check_fp16_range()
        # Every rank holds the whole reduced gradient here: its norm is the global one (before clipping).
        clip, measure = self.grad_clip, self.measure_grad_norm
        if clip and self.node is not None:
            norm = self.node.clip_(clip, [(b.start, b.start + b.flat.numel()) for b in self.buckets])
            self._grad_norm = norm if measure else None
        else:
            self._grad_norm = clip_and_measure(list(self.model.parameters()), clip, measure)
        if self.shards is not None:
            if self.shards.step():
                self._gather_params()
        else:
            self.optimizer.step()
        for b in self.buckets:
            if self.node is not None:
                point_grads(b, b.flat)  # back to this rank's slot, which the reduction already zeroed
                b.pending, b.handle = len(b.params), None
            else:
                rebind_grads(b)  # an optimizer or user code may have replaced a .grad: keep the views
                b.reset()

    def _step_sharded(self) -> None:
        """ZeRO-2: finish the reduce-scatters, free the whole gradients, step this rank's range from its shard."""
        for b in self.buckets:
            if b.handle is None:
                self._start(b)
        for b in self.buckets:
            b.handle.wait()
            if b.flat.numel():
                self._release(b)
        grads, clip, measure = self._grad_shard, self.grad_clip, self.measure_grad_norm
        self._grad_norm = None
        if clip or measure:
            # The ranges are disjoint: the global norm is the root of the summed squares of every rank's range.
            square = torch.linalg.vector_norm(grads, dtype=torch.float32).square().reshape(1)
            self.comm.Allreduce(square)
            norm = square.sqrt()[0]
            if clip:  # as clip_grad_norm_
                grads.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))
            self._grad_norm = norm if measure else None
        if self.zero3 is not None:
            self.shards.step(grads)
            self.zero3.free_all()  # the next forward gathers the updated ranges, unit by unit
        elif self.shards.step(grads):
            self._gather_params()
        for b in self.buckets:
            b.pending, b.handle = len(b.params), None

    def _check_fp16_range(self) -> None:
        """Stop with the fix when an fp16 wire overflowed (fp16-mixed's optimizer skips such steps instead)."""
        grads = [p.grad for b in self.buckets for p in b.params]
        if bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()):
            return
        raise FloatingPointError(
            "grad_comm = 'fp16': the reduced gradients hold inf/NaN. Either the gradients were already inf/NaN, "
            "or one (divided by the number of ranks) exceeded fp16's range (65504) and became inf on the wire. "
            "Use [parallel] grad_comm = 'bf16' (fp32's range) or 'fp32', or precision mode fp16-mixed, whose "
            "loss scaler skips such steps."
        )

    def consolidate(self, purpose: Purpose) -> None:
        """Before validation: average the BatchNorm statistics; before a checkpoint also gather a sharded
        optimizer's state on rank 0, unless each rank writes its own (the end of a run follows validation:
        nothing to do)."""
        if purpose == "outputs":
            # (ZeRO-3 with a run directory writes its weights shard-wise instead: nothing gathered.) Without one
            # (training from Python), the caller gets the whole model back: gathered once, at the end.
            if self.zero3 is not None:
                self.zero3.gather_whole()
            return
        self.synchronize()
        if purpose == "checkpoint":
            if self.zero3 is not None:
                raise ConfigError("[parallel] shard_params writes sharded checkpoints only: set [checkpoint] "
                                  "sharded = true")  # fmt: skip
            self.gather_state()

    def write_sharded_weights(self, directory: Path) -> bool:
        """ZeRO-3: each rank writes its range of the final weights (``ParamShards.write_weights``), nothing
        gathered; otherwise not done (rank 0 writes ``model.pt``)."""
        if self.zero3 is None:
            return False
        self.zero3.write_weights(directory)
        return True

    def synchronize(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over the ranks (collective).

        Each rank's running statistics follow only its own shard; the trainer calls this before validation and
        before each checkpoint, so evaluation and saved weights use statistics of the whole global batch stream.
        """
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if self.world.size == 1 or not buffers:
            return
        average_over_ranks(self.comm, self.world.size, buffers)

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond the model and optimizer: data-parallel state is the same on every rank."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing of its own; with a sharded optimizer, cut the whole state just loaded into this rank's range."""
        if self.shards is not None:
            self.shards.load_from_base()

    @property
    def collective_forward(self) -> bool:  # type: ignore[override]
        """ZeRO-3's forward gathers each block from every rank: the ranks run their forwards together."""
        return self.zero3 is not None and not self.zero3.whole

    def join_forward(self) -> None:
        """Take part in another rank's forward without a batch of this rank's own (ZeRO-3's gathers)."""
        if self.zero3 is not None:
            self.zero3.join_forward()

    def close(self) -> None:
        """Remove the hooks and give the gradients back as ordinary tensors."""
        self._unfuse()
        if self.zero3 is not None:
            self.zero3.close()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._grad_shard = None
        for b in self.buckets:
            for p in b.params:
                p.grad = None
        self.buckets, self._jobs = [], []
        if self.lowp is not None:
            if sys.exc_info()[0] is None:  # collective, like freeing the window below
                self.lowp.close()
            self.lowp = None
        if self.node is not None:
            # Freeing the window is collective: while an exception unwinds this rank alone (the others are
            # about to be aborted), a collective here would hang it before the abort could run.
            if sys.exc_info()[0] is None:
                self.node.close()
            self.node = None


class _Done:
    stream_ordered = False

    def wait(self) -> None:
        pass

    def test(self) -> bool:
        return True


_DONE = _Done()
