"""Asynchronous parameter server over MPI: the parameters are sharded across server ranks, worker ranks push
gradients and pull weights with non-blocking point-to-point messages, and nobody waits for a slow worker beyond
the staleness bound.

Roles: ranks 0 .. servers-1 are servers, the other ranks workers; rank 0 also does the main rank's duties (it
hands out the work, logs, evaluates and writes the run directory). The trainable parameters, flattened, are cut
into ``servers`` contiguous shards of (almost) equal size; each server owns one shard and an optimizer over it,
so momentum or Adam state lives with the shard, and the workers run no optimizer at all.

One worker's life: receive from every server its shard of the weights (with the shard's version) and, from
server 0, a work item (a worker-sized slice of a global batch, ``_async.WorkItems``) -> compute that item's
gradient -> push each server its slice (with the worker's clock and the versions it read) -> receive the replies
... until server 0 has no item left for it; then it tells every server "done". Server 0 hands items to whoever
asks next, so a straggler takes fewer of them instead of slowing everyone down. With ``pipeline = True`` a worker
computes its next item while its last push is in flight (hides message and server latency; costs one more update
of staleness, its own, which hurts SGD with momentum: measured in docs/async.md, hence off by default).

Stale-synchronous bound ``max_staleness = k`` (Ho et al., 2013): a worker's clock counts its pushes; the server
holds its reply to a worker that is more than k clocks ahead of the slowest live worker. ``k = None`` is fully
asynchronous (replies never held); ``k = 0`` is bulk-synchronous, and there the server sums one round's gradients
(one per worker) and takes a single optimizer step: synchronous SGD exactly, momentum and Adam state included.
With k >= 1 every gradient is one optimizer step as it arrives; then at most (W-1)(2k+1) other updates land
between a worker's read and its write. Replies and applied versions are recorded so that tests can check this.

Failures: servers never wait on one particular worker; they serve whoever sent. A worker that owes a push for
longer than ``dead_timeout`` seconds is declared dead: excluded from the bound, its item lost, and training goes
on without it; if it comes back it is told to stop. At the end, the servers wait ``dead_timeout`` more for
missing workers, write the outputs without them, and then end the job with a message naming them (MPI cannot
finish with a hung rank). A process that crashes outright ends the job through the MPI launcher, as always.
Waiting processes spin only briefly, then poll with short sleeps: such a job often has more processes than cores.

Checkpoints (``[checkpoint] every``, a time limit, SIGTERM/SIGUSR1 on rank 0): server 0 declares a *cut* at
the next unhanded item N and tells the other servers; it hands out no more items, and each worker, once every
push it made has been answered, *parks* (tells every server). When all workers are parked every server has
applied exactly the items before N, so all ranks save together through the trainer's checkpointer: rank 0 the
assembled weights, every server's optimizer state, clocks and records; each worker its BatchNorm buffers. Then
training goes on (or every rank exits with the requeue code); ``--resume`` restarts from such a cut with the
same servers and workers. Once a worker has been declared dead no further checkpoint is taken (it could never
join the collective write).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from caldera.checkpoint import Preempted
from caldera.comm.buckets import flatten, unflatten
from caldera.config import Seconds, StrategyOptions
from caldera.parallel import _async
from caldera.parallel._async import Snapshot, WorkItems, check_trainer, finish_run, trainable
from caldera.parallel.base import Strategy, register
from caldera.world import World

GRAD, DONE, WEIGHTS, STOP, PARK = 1, 2, 3, 4, 5  # message kinds
# Tags, on a communicator of our own, so they meet nobody else's.
PUSH, REPLY, FINAL, BUFFERS, CUT = 101, 102, 103, 104, 105
_NEEDS_FIT = ("async-ps runs its own loop on servers and workers: the trainer must hand it the run through "
              "strategy.fit(trainer, train_set, val_set) (Trainer.fit does so for strategies that have fit)")  # fmt: skip


def shard_bounds(total: int, servers: int) -> list[tuple[int, int]]:
    """Cut ``total`` flattened parameters into ``servers`` contiguous [start, stop) ranges of almost equal size."""
    base, extra = divmod(total, servers)
    bounds, start = [], 0
    for s in range(servers):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_plan(params: list[torch.Tensor], servers: int) -> list[list[tuple[int, int, int]]]:
    """For each server, the pieces it owns as (parameter index, first element, end element) of each tensor."""
    plan: list[list[tuple[int, int, int]]] = []
    for start, stop in shard_bounds(sum(p.numel() for p in params), servers):
        pieces, offset = [], 0
        for i, p in enumerate(params):
            lo, hi = max(start, offset), min(stop, offset + p.numel())
            if lo < hi:
                pieces.append((i, lo - offset, hi - offset))
            offset += p.numel()
        plan.append(pieces)
    return plan


class _Packet:
    """One message in one buffer: int64 header fields (the last one read as a float64 loss) followed by the
    float32 payload. Header-only messages ("done", "stop") send just the header."""

    # float32 slots read as int64 fields: kind, clock or version, version read or item, item, samples or cut
    # step, - or stop flag; then the loss as a float64.
    HEADER = 14

    def __init__(self, n: int) -> None:
        self.buf = torch.zeros(self.HEADER + n, dtype=torch.float32)
        self.array = self.buf.numpy()  # what MPI reads and writes: the same memory
        self.fields = self.array[: self.HEADER].view(np.int64)  # NumPy views: cheap to read and write
        self.loss = self.array[12:14].view(np.float64)
        self.payload = self.buf[self.HEADER :]

    @property
    def kind(self) -> int:
        return int(self.fields[0])

    def header(self) -> np.ndarray:
        return self.array[: self.HEADER]


def _mpi():
    from mpi4py import MPI

    return MPI


def _wait(requests: list, poll_s: float, spin_s: float = 2e-3) -> None:
    """Wait for MPI requests: spin first (a reply normally comes within a millisecond, and spinning drives MPI's
    progress fastest), then sleep between tests, so that a worker held back by the staleness bound leaves its
    core to the others (a parameter-server job often has more processes than cores)."""
    MPI, start = _mpi(), time.monotonic()
    while not MPI.Request.Testall(requests):
        if time.monotonic() - start > spin_s:
            time.sleep(poll_s)


class ParameterServerOptions(StrategyOptions):
    """``[parallel]`` keys of strategy ``async-ps``."""

    servers: int = Field(1, ge=1, description="ranks that hold parameter shards")
    max_staleness: int | None = Field(None, ge=0, description="0 = synchronous, none = unbounded")
    dead_timeout: Seconds = Field(
        60.0,
        gt=0,
        description="how long a silent worker may stay silent before it is dropped (60, '90s', '5m')",
    )
    pipeline: bool = Field(False, description="overlap the next gradient with the push")


@register("async-ps")
class ParameterServer(Strategy):
    """Sharded parameter servers and asynchronous workers over MPI point-to-point, with a staleness bound."""

    Options = ParameterServerOptions

    runs_own_loop = True  # server and worker ranks: fit() drives the run

    def __init__(
        self,
        *,
        servers: int = 1,
        max_staleness: int | None = None,
        dead_timeout: float = 60.0,
        record_every: int | None = None,
        grad_clip: float | None = None,
        pipeline: bool = False,
        poll_s: float = 2e-5,
    ) -> None:
        if servers < 1:
            raise ValueError(f"async-ps needs at least 1 server (got servers = {servers})")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None for unbounded (got {max_staleness})")
        if pipeline and max_staleness == 0:
            raise ValueError("max_staleness = 0 is synchronous SGD: a pipelined worker computes on weights one "
                             "update old; set pipeline = false, or allow some staleness")  # fmt: skip
        self.pipeline = pipeline
        self.servers, self.max_staleness, self.dead_timeout = servers, max_staleness, dead_timeout
        self.record_every, self.grad_clip, self.poll_s = record_every, grad_clip, poll_s
        self.stats: dict[str, Any] = {}
        self.snapshots: list[Snapshot] = []
        self.resumed: dict[str, Any] = {}  # the state a checkpoint held, when the run resumes
        self._keep: dict[str, Any] = {}  # the state of the checkpoint being written (rank 0)
        # Recorded by each server: (worker, its clock, version it read, version it was applied to, seconds into
        # training) per push, and (worker, its clock, the slowest live worker's clock) per reply.
        self.applied_log: list[tuple[int, int, int, int, float]] = []
        self.reply_log: list[tuple[int, int, int]] = []
        self._fitting = False

    # -- the run ------------------------------------------------------------------------------------------------
    def fit(self, trainer, train_set: Dataset, val_set: Dataset | None) -> list[dict[str, float]]:
        """Serve (server ranks) or train (worker ranks) until the run's work items are used up; then the main
        rank evaluates the recorded weights and writes the run directory, and every rank gets the final model."""
        check_trainer(trainer, "async-ps")
        self._fitting = True
        resumed = _async.restore(trainer, "async-ps")  # before setup: the shards are cut from these weights
        self.resumed = {}
        self.setup(trainer.model, trainer.optimizer, trainer.world)
        self._resume(resumed, getattr(trainer, "_restored_local", None), trainer.precision)
        self.trainer, self.checkpointer = trainer, trainer.checkpointer
        self._schedule = _async.schedule_of(trainer, self.n_workers)  # the servers apply it per item
        self.items = WorkItems(train_set, trainer.batch_size, self.n_workers, trainer.max_epochs, trainer.seed,
                               trainer.shuffle, trainer.drop_last, device=trainer.world.device)  # fmt: skip
        self._every = self.record_every or self.items.per_epoch
        trainer.log(
            f"async-ps: {self.servers} server(s) (ranks 0-{self.servers - 1}, shards of "
            f"{'/'.join(str(b - a) for a, b in self.bounds)} parameters), {self.n_workers} workers; "
            f"max_staleness = {self.max_staleness}; {self.items.total} work items of "
            f"{trainer.batch_size // self.n_workers} samples ({trainer.max_epochs} epochs)"
            + (f"; resuming after update {resumed['updates']}" if resumed else "")
        )
        self.comm.Barrier()
        # The clock starts when every rank is ready (a resumed run continues the saved run's clock).
        self.t0 = time.monotonic() - resumed.get("train_s", 0.0)
        if self.checkpointer is not None:
            self.checkpointer.install_signal_handlers()
        try:
            if self.is_server:
                trainer.total_steps = self.items.total
                with trainer._progress_bar() as self._bar:  # rank 0's rich bar (None elsewhere)
                    self.serve(resumed)
                return self._finish_server(trainer, val_set)
            self._train(trainer)
            return self._receive_final(trainer)
        finally:
            if self.checkpointer is not None:
                self.checkpointer.restore_signal_handlers()
            self.close()

    def _resume(self, state: dict[str, Any], local: dict[str, Any] | None, precision) -> None:
        """Check that a checkpoint fits this job; give each server its optimizer state, each worker its buffers."""
        self._resumed_state = state
        if not state:
            return
        if (state["servers"], state["workers"]) != (self.servers, self.n_workers):
            raise _async.config_error(f"the checkpoint was written by async-ps with {state['servers']} server(s) "
                                      f"and {state['workers']} workers; resume with [parallel] servers = "
                                      f"{state['servers']} on {state['servers'] + state['workers']} ranks")  # fmt: skip
        if self.is_server:
            self.optimizer.load_state_dict(state["optimizers"][self.rank])
        elif local is not None and "buffers" in local:
            with torch.no_grad():
                for b, value in zip(self._buffers, local["buffers"]):
                    b.copy_(value)
            precision.load_state_dict(local["precision"])

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Assign roles, give every rank rank 0's weights, build the server's shard and optimizer."""
        if not self._fitting:
            raise RuntimeError(_NEEDS_FIT)
        if world.size <= self.servers or not hasattr(world.comm, "comm"):
            raise _async.config_error(f"async-ps with {self.servers} server(s) needs at least {self.servers + 1} MPI "
                             f"ranks (got {world.size}); run it under mpiexec -n N with N > servers")  # fmt: skip
        # The servers step plain optimizers: gradients reach them unscaled (see _async.compute_item).
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a precision wrapper's inner optimizer
        settings = [{k: v for k, v in g.items() if k in optimizer.defaults} for g in optimizer.param_groups]
        if any(s != settings[0] for s in settings):
            raise _async.config_error("async-ps gives each server shard one set of optimizer settings; use a single "
                             "parameter group (or identical settings in every group)")  # fmt: skip
        self.model, self.world = model, world
        MPI = _mpi()
        self.comm = world.comm.comm.Dup()
        self.rank, self.n_workers = world.rank, world.size - self.servers
        self.is_server = self.rank < self.servers
        self._servers_comm = self.comm.Split(0 if self.is_server else MPI.UNDEFINED, self.rank)
        self._params = trainable(model)
        self._buffers = [
            b for b in model.buffers() if b.is_floating_point()
        ]  # not served: workers keep theirs
        with torch.no_grad():
            for t in self._params:
                world.comm.Bcast(t.data, root=0)
        self.bounds = shard_bounds(sum(p.numel() for p in self._params), self.servers)
        if self.is_server:
            start, stop = self.bounds[self.rank]
            self.shard = torch.nn.Parameter(flatten(self._params)[start:stop].clone())
            self.optimizer = type(optimizer)([self.shard], **settings[0])
        else:
            self._flat = flatten(self._params)  # staging vectors for the weights in and the gradients out
            self._grads = torch.zeros_like(self._flat)
            self._out = [_Packet(b - a) for a, b in self.bounds]
            self._in = [_Packet(b - a) for a, b in self.bounds]
        return model

    # -- server -------------------------------------------------------------------------------------------------
    def serve(self, resumed: dict[str, Any] | None = None) -> None:
        """Answer pushes from any worker, in arrival order, until every worker is done (or declared dead)."""
        MPI, W, n = _mpi(), self.n_workers, self.shard.numel()
        resumed = resumed or {}
        self._inbox = [_Packet(n) for _ in range(W)]
        self._outbox = [_Packet(n) for _ in range(W)]
        self._recv = [self._post(i) for i in range(W)]  # one receive always posted per worker
        self._sent = [MPI.REQUEST_NULL] * W
        self.clock, self.state = list(resumed.get("clocks", [0] * W)), ["live"] * W
        self.owed_since, self.held = [time.monotonic()] * W, set()
        self.refused = self.delayed = 0
        self.version = resumed["versions"][self.rank] if resumed else 0
        self.applied = self.next_item = resumed.get("updates", 0)
        self._fresh: set[int] = set()  # pushes handled in this pass: a reply not sent now counts as delayed
        self.dead: list[tuple[int, float]] = []
        self._grad = torch.zeros(n)
        self._round: dict[int, tuple[int, torch.Tensor]] = {}  # k = 0: (item, gradient) of each worker
        self._losses = np.zeros((self._n_records(), 2))
        start, stop = self.bounds[self.rank]
        self.snapshots = [
            Snapshot(s.items, s.time_s, s.weights[start:stop]) for s in _async.records_from(resumed)
        ]
        if resumed:
            self._losses[:] = resumed["losses"]
        self._next_record, self._quiet_since = (len(self.snapshots) + 1) * self._every, None
        self._cut: tuple[int, int] | None = None  # (checkpoint step, stop?) while a checkpoint is being taken
        self._cut_msg = np.zeros(2, dtype=np.int64)
        self._cut_req = self._post_cut()
        for i in range(W):
            self._reply(i, first=True)  # the current version and the first work item(s)
        next_check = next_poll = time.monotonic()
        while not self._finished():
            if time.monotonic() >= next_poll:  # even under a steady stream of pushes
                next_poll = time.monotonic() + 0.01
                self._poll_cut()
                if self._bar is not None:
                    record = min(self.applied // self._every, len(self._losses) - 1)
                    loss_sum, samples = self._losses[record]
                    self._bar.show(
                        self.applied, self.items.per_epoch, loss_sum / samples if samples else None
                    )
            if self._cut is not None and all(s == "parked" for s in self.state):
                self._checkpoint()
                continue
            arrived = MPI.Request.Testsome(self._recv)
            if arrived:
                for i in arrived:
                    self._handle(i)
                self._release()
            elif time.monotonic() >= next_check:  # silence is judged in dead_timeout units: no hurry
                next_check = time.monotonic() + min(0.01, self.dead_timeout / 10)
                if self._expire():
                    self._release()
            else:
                time.sleep(self.poll_s)  # a short nap: the workers may need this core more
        self._drain()

    def _post(self, i: int):
        return self.comm.Irecv(self._inbox[i].array, source=self.servers + i, tag=PUSH)

    def _handle(self, i: int) -> None:
        msg = self._inbox[i]
        if msg.kind == DONE:
            self.state[i] = "done"  # its receive is not posted again
            return
        if msg.kind == PARK:  # every push of this worker is answered: it waits for the checkpoint
            self.state[i] = "parked"
        elif self.state[i] != "live":  # declared dead earlier: its gradient is too late to use
            self.refused += 1
            self._reply(i, stop=True)
        else:
            _, clock, read, item, samples = msg.fields[:5].tolist()
            self.applied_log.append((i, clock, read, self.version, time.monotonic() - self.t0))
            self.clock[i] = clock
            if self.rank == 0:
                record = min(item // self._every, len(self._losses) - 1)
                self._losses[record] += (msg.loss[0] * samples, samples)
            if self.max_staleness == 0:
                self._round[i] = (item, msg.payload.clone())  # summed when the round is complete
            else:
                self._apply([msg.payload], item)
            self.held.add(i)  # _release decides when it may have its reply
            self._fresh.add(i)
        self._recv[i] = self._post(i)

    def _apply(self, grads: list[torch.Tensor], item: int) -> None:
        if self._schedule is not None:  # the rate of the global batch the (first) item belongs to
            self.optimizer.param_groups[0]["lr"] = self._schedule.lr(0, item)
        self._grad.copy_(grads[0])
        for g in grads[1:]:
            self._grad.add_(g)
        self.shard.grad = self._grad
        self.optimizer.step()
        self.version += 1
        self.applied += len(grads)
        while self.applied >= self._next_record:
            self._snapshot()
            self._next_record += self._every

    def _snapshot(self) -> None:
        self.snapshots.append(Snapshot(self.applied, time.monotonic() - self.t0, self.shard.detach().clone()))

    def _release(self) -> None:
        """Finish a complete synchronous round (k = 0), then reply to every held worker within the bound."""
        live = [j for j in range(self.n_workers) if self.state[j] == "live"]
        if self._round and all(self.clock[j] > self.version for j in live):
            round_items = [item for item, _ in self._round.values()]
            self._apply([self._round[j][1] for j in sorted(self._round)], min(round_items))  # worker order
            self._round.clear()
        slowest = min((self.clock[j] for j in live), default=0)
        for i in sorted(self.held):
            if self.max_staleness is None or self.clock[i] - slowest <= self.max_staleness:
                self.held.discard(i)
                self.reply_log.append((i, self.clock[i], slowest))
                self._reply(i)
        self.delayed += len(self.held & self._fresh)
        self._fresh.clear()

    def _reply(self, i: int, stop: bool = False, first: bool = False) -> None:
        """Send worker i the shard's weights and (server 0) its next work item, -1 when none is left; a
        pipelined worker gets two items first, so that it always has one to compute. ``stop``: go away."""
        out, items = self._outbox[i], [-1, -1]
        self._sent[i].Wait()  # the previous reply has left (the worker answered it, so this is immediate)
        if self.rank == 0 and not stop and self._cut is None:  # server 0 hands out the work
            for slot in range(2 if first and self.pipeline else 1):
                if self.next_item < self.items.total:
                    items[slot], self.next_item = self.next_item, self.next_item + 1
        cut = self._cut or (-1, 0)  # a worker told of a cut parks once its work in hand is answered
        out.fields[:6] = (STOP if stop else WEIGHTS, self.version, *items, *cut)
        if not stop:
            out.payload.copy_(self.shard.detach())
        self._sent[i] = self.comm.Isend(out.header() if stop else out.array, dest=self.servers + i, tag=REPLY)
        self.owed_since[i] = time.monotonic()

    def _expire(self) -> bool:
        """Declare dead a live worker that owes a push for longer than ``dead_timeout`` (held ones owe nothing);
        return True if one was."""
        now, before = time.monotonic(), len(self.dead)
        for i in range(self.n_workers):
            if (
                self.state[i] == "live"
                and i not in self.held
                and now - self.owed_since[i] > self.dead_timeout
            ):
                self.state[i] = "dead"
                self.dead.append((self.servers + i, now - self.t0))
                if self.rank == 0:
                    sys.stderr.write(f"caldera async-ps: worker rank {self.servers + i} silent for more than "
                                     f"{self.dead_timeout:g} s: training continues without it\n")  # fmt: skip
        return len(self.dead) > before

    def _finished(self) -> bool:
        if all(s == "done" for s in self.state):
            return True
        if "live" in self.state or "parked" in self.state:
            return False
        # Only done and dead workers are left: give the dead ``dead_timeout`` more to come back and say done.
        self._quiet_since = self._quiet_since or time.monotonic()
        return time.monotonic() - self._quiet_since > self.dead_timeout

    # -- checkpoints (a consistent cut) ---------------------------------------------------------------------------
    def _post_cut(self):
        """Servers other than 0 always have a receive posted for server 0's cut announcement."""
        return self.comm.Irecv(self._cut_msg, source=0, tag=CUT) if self.rank > 0 else None

    def _poll_cut(self) -> None:
        """Server 0: declare a cut when a checkpoint is due or a stop is asked for; the others: hear of it."""
        if self._cut is not None:
            return
        if self.rank > 0:
            if self._cut_req.Test():
                self._cut = (int(self._cut_msg[0]), int(self._cut_msg[1]))
            return
        if self.checkpointer is None or self.dead or self.next_item >= self.items.total:
            return  # the end of the run writes its own checkpoint
        due, stop = self.checkpointer.poll(self.applied)
        if due or stop:
            self._cut = (self.next_item, int(stop is not None))
            for s in range(1, self.servers):
                self.comm.Send(np.array(self._cut, dtype=np.int64), dest=s, tag=CUT)

    def _checkpoint(self) -> None:
        """Every worker is parked: every item before the cut is applied here. Save together, then go on."""
        step, stop = self._cut  # type: ignore[misc]
        if self.applied != step:
            raise RuntimeError(f"async-ps server {self.rank}: {self.applied} updates applied at the cut of "
                               f"{step}; the checkpoint would not be consistent")  # fmt: skip
        everyone = self._servers_comm.gather(self._shard_state(), root=0)
        if self.rank == 0:
            self._keep = self._checkpoint_state(everyone, step, self._assemble(everyone))
        path = _async.save(self.trainer, step, self.items)
        if stop:
            self._drain()
            raise Preempted(self.checkpointer.stop_reason or "stop requested on rank 0", path)
        self._cut = None
        self._cut_req = self._post_cut()
        for i in range(self.n_workers):
            self.state[i] = "live"
            self._reply(i, first=True)  # fresh weights and work: the parked workers go on

    def _shard_state(self) -> dict[str, Any]:
        """What a server sends rank 0 to assemble the model: its shard, optimizer state, version and records."""
        return {"optimizer": self.optimizer.state_dict(), "version": self.version, "shard": self.shard.detach(),
                "snapshots": self.snapshots}  # fmt: skip

    def _assemble(self, everyone: list[dict]) -> list[Snapshot]:
        """Rank 0: the recorded snapshots of the whole model (every server's shard), each with its record's loss."""
        n = min(len(e["snapshots"]) for e in everyone)
        snapshots = [Snapshot(snap.items, snap.time_s, torch.cat([e["snapshots"][r].weights for e in everyone]))
                     for r, snap in enumerate(self.snapshots[:n])]  # fmt: skip
        for r, snap in enumerate(snapshots):  # snapshot r closes record r (items are numbered in order)
            snap.loss_sum, snap.samples = self._losses[min(r, len(self._losses) - 1)]
        return snapshots

    def _checkpoint_state(self, everyone: list[dict], step: int, snapshots: list[Snapshot]) -> dict[str, Any]:
        """Rank 0: the assembled model (into this rank's model), every server's optimizer state and the records."""
        unflatten(torch.cat([e["shard"] for e in everyone]), self._params)
        return {
            "strategy": "async-ps", "servers": self.servers, "workers": self.n_workers, "updates": step,
            "versions": [e["version"] for e in everyone], "clocks": list(self.clock),
            "optimizers": [e["optimizer"] for e in everyone], "losses": self._losses.copy(),
            "train_s": time.monotonic() - self.t0, **_async.saved_records(snapshots),
        }  # fmt: skip

    def _drain(self) -> None:
        """Leave no request behind: cancel the receives still posted (a message that slipped in is used)."""
        MPI = _mpi()
        if self._cut_req is not None and self._cut is None:
            self._cut_req.Cancel()
            self._cut_req.Wait()
        for i, req in enumerate(self._recv):
            if req != MPI.REQUEST_NULL:
                req.Cancel()
                status = MPI.Status()
                req.Wait(status)
                if not status.Is_cancelled() and self._inbox[i].kind == DONE:
                    self.state[i] = "done"
        for i, req in enumerate(self._sent):
            if self.state[i] == "done":
                req.Wait()

    def _n_records(self) -> int:
        return -(-self.items.total // self._every)

    def _finish_server(self, trainer, val_set: Dataset | None) -> list[dict[str, float]]:
        """Agree on who finished, assemble the recorded shards on rank 0, evaluate, write, send the result."""
        MPI = _mpi()
        if not self.snapshots or self.snapshots[-1].items != self.applied:  # items lost to dead workers
            self._snapshot()
        servers = self._servers_comm
        done = np.array([s == "done" for s in self.state], dtype=np.int32)
        servers.Allreduce(MPI.IN_PLACE, done, op=MPI.MIN)  # a member finished with every server
        mine = {**self._shard_state(), "applied": self.applied_log, "replies": self.reply_log,
                "dead": self.dead, "refused": self.refused, "delayed": self.delayed}  # fmt: skip
        everyone = servers.gather(mine, root=0)
        if self.rank != 0:
            return self._receive_final(trainer)
        self.snapshots = self._assemble(everyone)
        self.stats = self._summary(everyone, done)
        self._average_worker_buffers(done)
        trainer.log(f"async-ps: {self.stats['updates']} updates in {self.stats['train_s']:.2f} s (per worker "
                    f"{self.stats['updates_per_worker']}); staleness mean {self.stats['staleness_mean']:.2f}, "
                    f"max {self.stats['staleness_max']}; replies held back {self.stats['delayed_replies']}")  # fmt: skip
        history = finish_run(
            trainer, self.snapshots, val_set, self.items.per_epoch, self.stats, self._schedule
        )
        missing = [self.servers + i for i in range(self.n_workers) if not done[i]]
        # The end of the run is checkpointed like the trainer's, by every rank together: not with a rank missing.
        checkpoint = self.checkpointer is not None and not missing
        final = {"weights": self.snapshots[-1].weights, "buffers": [b.cpu() for b in self._buffers],
                 "history": history, "stats": self.stats, "checkpoint": checkpoint, "step": self.applied}  # fmt: skip
        members = [r for r in range(1, self.world.size) if r < self.servers or done[r - self.servers]]
        for r in members:
            self.comm.send(final, dest=r, tag=FINAL)
        if checkpoint:
            self._keep = self._checkpoint_state(everyone, self.applied, self.snapshots)
            unflatten(final["weights"], self._params)  # the model the run ends with (last snapshot)
            _async.save(trainer, self.applied, self.items)
        if missing:
            self.world.abort(f"async-ps: worker rank(s) {missing} went silent and never came back; training "
                             "finished without them and the outputs are written; ending the job, since MPI "
                             "cannot finish with a hung rank")  # fmt: skip
        return history

    def _average_worker_buffers(self, done: np.ndarray) -> None:
        """The servers never run the model, so its buffers (BatchNorm statistics) come from the workers."""
        if not self._buffers:
            return
        received = [
            self.comm.recv(source=self.servers + i, tag=BUFFERS) for i in range(self.n_workers) if done[i]
        ]
        with torch.no_grad():
            for j, b in enumerate(self._buffers if received else []):
                b.copy_(torch.stack([r[j].to(b.dtype) for r in received]).mean(0))

    def _summary(self, everyone: list[dict], done: np.ndarray) -> dict[str, Any]:
        applied = everyone[0]["applied"]
        lags = [v_apply - v_read for _, _, v_read, v_apply, _ in applied]
        gaps = [clock - slowest for s in everyone for _, clock, slowest in s["replies"]]
        return {
            "strategy": "async-ps", "servers": self.servers, "workers": self.n_workers,
            "max_staleness": self.max_staleness, "updates": len(applied) + self._resumed_state.get("updates", 0),
            "resumed_from": self._resumed_state.get("updates", 0),
            "updates_per_worker": np.bincount([w for w, *_ in applied], minlength=self.n_workers).tolist(),
            "staleness_mean": float(np.mean(lags)) if lags else 0.0, "staleness_max": max(lags, default=0),
            "clock_gap_max": max(gaps, default=0),
            "delayed_replies": sum(s["delayed"] for s in everyone),
            "dead": sorted({rank: t for s in everyone for rank, t in sorted(s["dead"], reverse=True)}.items()),
            "refused": sum(s["refused"] for s in everyone),
            "finished": done.tolist(), "train_s": self.snapshots[-1].time_s,
            "shards": [list(b) for b in self.bounds],
        }  # fmt: skip

    # -- worker -------------------------------------------------------------------------------------------------
    def _train(self, trainer) -> None:
        """Compute the items server 0 hands out until it has none left, then tell every server "done"."""
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
                    self._park(trainer)
                continue
            self.item = self.queue.popleft()
            x, y, n_local, n_global = self.items.batch(self.item)
            loss = _async.compute_item(trainer.precision, self.model, trainer.loss_fn, self._params, x, y,
                                       n_local / n_global, self.backward, trainer.accumulate,
                                       where=f"work item {self.item} on worker rank {self.rank}")  # fmt: skip
            self._loss, self._samples = float(loss.detach()), n_local
            self.step()
        bye = []
        for s, out in enumerate(self._out):
            out.fields[0] = DONE
            bye.append(self.comm.Isend(out.header(), dest=s, tag=PUSH))
        _wait(bye, self.poll_s)
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
        _wait(self._sending + replies, self.poll_s)
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

    def _park(self, trainer) -> None:
        """All work in hand is answered and a cut was announced: tell the servers, save with every rank, go on."""
        step, stop = self.cut  # type: ignore[misc]
        parked = []
        for s, out in enumerate(self._out):
            out.fields[0] = PARK
            parked.append(self.comm.Isend(out.header(), dest=s, tag=PUSH))
        _wait(parked, self.poll_s)
        path = _async.save(trainer, step, self.items, local=self._local_state(trainer))
        if stop:
            raise Preempted("stop requested on rank 0", path)
        self._pull()  # after the checkpoint every server replies with fresh weights and work

    def _local_state(self, trainer) -> dict[str, Any]:
        """What a worker's own checkpoint file holds: its BatchNorm statistics and its fp16 loss scale."""
        return {
            "buffers": [b.detach().cpu() for b in self._buffers],
            "precision": trainer.precision.state_dict(),
        }

    def _receive_final(self, trainer) -> list[dict[str, float]]:
        """Wait (sleeping, not spinning: rank 0 is evaluating) for rank 0's final weights and history."""
        while not self.comm.Iprobe(source=0, tag=FINAL):
            time.sleep(10 * self.poll_s)
        final = self.comm.recv(source=0, tag=FINAL)
        unflatten(final["weights"], self._params)
        with torch.no_grad():
            for b, value in zip(self._buffers, final["buffers"]):
                b.copy_(value)
        self.stats = final["stats"]
        trainer.history = list(final["history"])
        if final["checkpoint"]:
            local = self._local_state(trainer) if not self.is_server else None
            _async.save(trainer, final["step"], self.items, local=local)
        return trainer.history

    # -- the rest of the protocol -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank 0, at a checkpoint: every server's optimizer state and version, the clocks, the records."""
        return self._keep

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's state for ``fit`` to restore."""
        self.resumed = state

    def close(self) -> None:
        """Nothing to release: every request is complete when ``fit`` returns (the duplicated communicator goes
        with MPI at exit; freeing it would be a collective that an excluded rank could never join)."""
        self._fitting = False
