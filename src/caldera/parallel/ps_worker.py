"""The worker ranks of async-ps: pull every server's shard of the weights and a work item from server 0, compute
the item's gradient, push each server its slice, and repeat until no item is left; park at a checkpoint cut.
Workers run no optimizer (the servers do). See ``param_server`` for the protocol, ``ps_wire`` for the messages.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from caldera.checkpoint import Preempted
from caldera.comm.buckets import flatten, unflatten
from caldera.parallel import _async
from caldera.parallel.context import RunContext
from caldera.parallel.ps_wire import BUFFERS, DONE, GRAD, PARK, PUSH, REPLY, STOP, Job, Packet, wait


class Worker:
    """One worker rank: staging buffers for the weights in and the gradient out, its clock and its queue."""

    def __init__(self, job: Job, ctx: RunContext, params: list[torch.nn.Parameter], buffers: list[torch.Tensor],
                 resumed: dict[str, Any], local: dict[str, Any] | None, grad_clip: float | None) -> None:  # fmt: skip
        self.job, self.ctx, self.model = job, ctx, ctx.model
        self.comm, self.rank, self.servers, self.n_workers = job.comm, job.rank, job.servers, job.n_workers
        self.bounds, self.items, self.poll_s, self.pipeline = job.bounds, job.items, job.poll_s, job.pipeline
        self._params, self._buffers, self.grad_clip = params, buffers, grad_clip
        self._resumed_state = resumed
        self._flat = flatten(params)  # staging vectors for the weights in and the gradients out
        self._grads = torch.zeros_like(self._flat)
        self._out = [Packet(b - a) for a, b in self.bounds]
        self._in = [Packet(b - a) for a, b in self.bounds]
        if (
            resumed and local is not None and "buffers" in local
        ):  # its BatchNorm statistics and fp16 loss scale
            with torch.no_grad():
                for b, value in zip(self._buffers, local["buffers"]):
                    b.copy_(value)
            ctx.precision.load_state_dict(local["precision"])

    def train(self) -> None:
        """Compute the items server 0 hands out until it has none left, then tell every server "done"."""
        ctx = self.ctx
        self.model.train()
        clocks = self._resumed_state.get("clocks")
        self.worker_clock = clocks[self.rank - self.servers] if clocks else 0
        self.versions, self.excluded = [0] * self.servers, False
        self.queue: deque[int] = deque()
        self._sending: list = []
        self._awaiting = False  # a push whose reply has not been collected yet
        self.cut: tuple[int, int] | None = None  # (checkpoint step, stop?) once server 0 announced a cut
        self._pull()  # the current version and the first item (two when pipelining)
        while not self.excluded and (self.queue or self._awaiting or self.cut):
            if not self.queue:  # nothing to compute until the last reply says whether more work comes
                if self._awaiting:
                    self._pull()
                else:
                    self._park()
                continue
            self.item = self.queue.popleft()
            x, y, n_local, n_global = self.items.batch(self.item)
            loss = _async.compute_item(ctx.precision, self.model, ctx.step or ctx.loss_fn, self._params, x, y,
                                       n_local / n_global, self.backward, ctx.accumulate,
                                       where=f"work item {self.item} on worker rank {self.rank}")  # fmt: skip
            self._loss, self._samples = float(loss.detach()), n_local
            self.step()
        bye = []
        for s, out in enumerate(self._out):
            out.fields[0] = DONE
            bye.append(self.comm.Isend(out.header(), dest=s, tag=PUSH))
        wait(bye, self.poll_s)
        if self._buffers and not self.excluded:  # BatchNorm statistics: rank 0 averages the workers' own
            self.comm.send([b.detach().cpu() for b in self._buffers], dest=0, tag=BUFFERS)

    def backward(self, loss: torch.Tensor) -> None:
        """Compute this worker's gradient (nothing is sent until ``step``)."""
        loss.backward()

    def step(self) -> None:
        """Push each server its slice of the gradient.

        Not pipelined: then wait for this push's reply (fresh weights, next item). Pipelined: collect the reply to
        the *previous* push first, and return at once after pushing, so that the next item is computed while this
        push travels and the server works: messages and server time hide behind computation, for one more update
        of staleness (the next gradient cannot include this worker's own update).
        """
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        read = list(self.versions)  # the weights this gradient was computed on
        flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params], out=self._grads
        )
        for p in self._params:
            p.grad = None
        if self._awaiting:
            self._pull()
            if self.excluded:
                return
        self.worker_clock += 1
        self._sending = []
        for s, ((start, stop), out) in enumerate(zip(self.bounds, self._out)):
            out.fields[:5] = (GRAD, self.worker_clock, read[s], self.item, self._samples)
            out.loss[0] = self._loss
            out.payload.copy_(self._grads[start:stop])
            self._sending.append(self.comm.Isend(out.array, dest=s, tag=PUSH))
        self._awaiting = True
        if not self.pipeline:
            self._pull()

    def _pull(self) -> None:
        """Wait for one reply from every server: load the weights, queue the item(s) server 0 handed out."""
        replies = [self.comm.Irecv(p.array, source=s, tag=REPLY) for s, p in enumerate(self._in)]
        wait(self._sending + replies, self.poll_s)
        self._awaiting = False
        if any(p.kind == STOP for p in self._in):  # excluded by a server (declared dead earlier)
            self.excluded = True
            return
        for (start, stop), p in zip(self.bounds, self._in):
            self._flat[start:stop].copy_(p.payload)
        unflatten(self._flat, self._params)
        self.versions = [int(p.fields[1]) for p in self._in]  # NumPy ints -> Python ints
        self.queue.extend(item for item in self._in[0].fields[2:4].tolist() if item >= 0)
        step, stop = self._in[0].fields[4:6].tolist()
        self.cut = (step, stop) if step >= 0 else None

    def _park(self) -> None:
        """All work in hand is answered and a cut was announced: tell the servers, save with every rank, go on."""
        step, stop = self.cut  # type: ignore[misc]
        parked = []
        for s, out in enumerate(self._out):
            out.fields[0] = PARK
            parked.append(self.comm.Isend(out.header(), dest=s, tag=PUSH))
        wait(parked, self.poll_s)
        path = _async.save(self.ctx, step, self.items, local=self.local_state())
        if stop:
            raise Preempted("stop requested on rank 0", path)
        self._pull()  # after the checkpoint every server replies with fresh weights and work

    def local_state(self) -> dict[str, Any]:
        """What a worker's own checkpoint file holds: its BatchNorm statistics and its fp16 loss scale."""
        return {
            "buffers": [b.detach().cpu() for b in self._buffers],
            "precision": self.ctx.precision.state_dict(),
        }
