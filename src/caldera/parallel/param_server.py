"""Asynchronous parameter server over MPI: the parameters are sharded across server ranks, worker ranks push
gradients and pull weights with non-blocking point-to-point messages, and nobody waits for a slow worker beyond
the staleness bound.

Modules: this one is the strategy (its options, roles, set-up and the end of the run); ``ps_server`` the server
ranks, ``ps_worker`` the worker ranks, ``ps_wire`` the messages both speak and how the parameters are cut.

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
applied exactly the items before N, so all ranks save together through the run's checkpointer (``ctx.save``): rank 0 the
assembled weights, every server's optimizer state, clocks and records; each worker its BatchNorm buffers. Then
training goes on (or every rank exits with the requeue code); ``--resume`` restarts from such a cut with the
same servers and workers. Once a worker has been declared dead no further checkpoint is taken (it could never
join the collective write).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from torch.utils.data import Dataset

from caldera.comm.buckets import unflatten
from caldera.config import Seconds, StrategyOptions
from caldera.names import NOT_COMPILED
from caldera.parallel import _async
from caldera.parallel._async import WorkItems, check_run
from caldera.parallel.base import Strategy, register
from caldera.parallel.context import RunContext, Snapshot, trainable
from caldera.parallel.ps_server import Server
from caldera.parallel.ps_wire import FINAL, Job, mpi, shard_bounds
from caldera.parallel.ps_wire import shard_plan as shard_plan  # re-exported: where callers found it
from caldera.parallel.ps_worker import Worker
from caldera.world import World

_NEEDS_FIT = ("async-ps runs its own loop on servers and workers: the trainer must hand it the run through "
              "strategy.fit(ctx, train_set, val_set) (Trainer.fit does so for strategies that run their own loop)")  # fmt: skip


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
    not_compiled = NOT_COMPILED["async-ps"]
    needs_mpi = True  # its own mpi4py communicators and requests (ps_server, ps_worker)

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
        self._role: Server | Worker | None = None  # this rank's part, once fit has begun
        # Recorded by each server: (worker, its clock, version it read, version it was applied to, seconds into
        # training) per push, and (worker, its clock, the slowest live worker's clock) per reply.
        self.applied_log: list[tuple[int, int, int, int, float]] = []
        self.reply_log: list[tuple[int, int, int]] = []
        self._fitting = False

    # -- the run ------------------------------------------------------------------------------------------------
    def fit(self, ctx: RunContext, train_set: Dataset, val_set: Dataset | None) -> list[dict[str, float]]:
        """Serve (server ranks) or train (worker ranks) until the run's work items are used up; then the main
        rank evaluates the recorded weights and writes the run directory, and every rank gets the final model."""
        check_run(ctx, "async-ps")
        self._fitting = True
        # Before setup: the shards are cut from these weights.
        resumed, local = _async.restore(ctx, lambda: self.resumed, "async-ps")
        self.resumed = {}
        self.setup(ctx.model, ctx.optimizer, ctx.world)
        self._check_resumed(resumed)
        self._resumed_state = resumed
        schedule = _async.schedule_of(ctx, self.n_workers)  # the servers apply it per item
        self.items = WorkItems(train_set, ctx.batch_size, self.n_workers, ctx.max_epochs, ctx.seed,
                               ctx.shuffle, ctx.drop_last, device=ctx.world.device,
                               whole=ctx.step is not None)  # fmt: skip
        self._every = self.record_every or self.items.per_epoch
        # t0 (0 here) is set once every rank is ready, below.
        job = Job(self.comm, self.rank, self.servers, self.n_workers, self.bounds, self.items, self._every, 0.0,
                  self.poll_s, self.pipeline)  # fmt: skip
        if self.is_server:
            self._role = server = Server(job, ctx, self._params, self._buffers, self._optimizer, self._servers_comm,
                                         resumed, self.max_staleness, self.dead_timeout, schedule)  # fmt: skip
            # The same lists the server fills, live.
            self.applied_log, self.reply_log = server.applied_log, server.reply_log
        else:
            self._role = Worker(job, ctx, self._params, self._buffers, resumed, local, self.grad_clip)
        ctx.log(
            f"async-ps: {self.servers} server(s) (ranks 0-{self.servers - 1}, shards of "
            f"{'/'.join(str(b - a) for a, b in self.bounds)} parameters), {self.n_workers} workers; "
            f"max_staleness = {self.max_staleness}; {self.items.total} work items of "
            f"{ctx.batch_size // self.n_workers} samples ({ctx.max_epochs} epochs)"
            + (f"; resuming after update {resumed['updates']}" if resumed else "")
        )
        self.comm.Barrier()
        # The clock starts when every rank is ready (a resumed run continues the saved run's clock).
        self.t0 = job.t0 = time.monotonic() - resumed.get("train_s", 0.0)
        if ctx.checkpointer is not None:
            ctx.checkpointer.install_signal_handlers()
        try:
            if isinstance(self._role, Server):
                with ctx.progress_bar(self.items.total) as bar:  # rank 0's rich bar (None elsewhere)
                    self._role.serve(bar)
                history = self._role.finish(val_set)
                self.snapshots, self.stats = self._role.snapshots, self._role.stats
                return history if history is not None else self._receive_final(ctx)
            self._role.train()
            return self._receive_final(ctx)
        finally:
            if ctx.checkpointer is not None:
                ctx.checkpointer.restore_signal_handlers()
            self.close()

    def _check_resumed(self, state: dict[str, Any]) -> None:
        """A checkpoint must come from a job with as many servers and workers as this one."""
        if state and (state["servers"], state["workers"]) != (self.servers, self.n_workers):
            raise _async.config_error(f"the checkpoint was written by async-ps with {state['servers']} server(s) "
                                      f"and {state['workers']} workers; resume with [parallel] servers = "
                                      f"{state['servers']} on {state['servers'] + state['workers']} ranks")  # fmt: skip

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Assign roles, give every rank rank 0's weights, cut the parameters into the servers' shards."""
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
        self._optimizer = (type(optimizer), settings[0])  # each server builds one over its shard
        self.model, self.world = model, world
        MPI = mpi()
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
        return model

    def _receive_final(self, ctx: RunContext) -> list[dict[str, float]]:
        """Wait (sleeping, not spinning: rank 0 is evaluating) for rank 0's final weights and history."""
        while not self.comm.Iprobe(source=0, tag=FINAL):
            time.sleep(10 * self.poll_s)
        final = self.comm.recv(source=0, tag=FINAL)
        unflatten(final["weights"], self._params)
        with torch.no_grad():
            for b, value in zip(self._buffers, final["buffers"]):
                b.copy_(value)
        self.stats = final["stats"]
        ctx.history = list(final["history"])
        if final["checkpoint"]:
            local = self._role.local_state() if isinstance(self._role, Worker) else None
            _async.save(ctx, final["step"], self.items, local=local)
        return ctx.history

    # -- the rest of the protocol: a worker's backward and step are its own (ps_worker) -------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Compute this worker's gradient (nothing is sent until ``step``)."""
        loss.backward()

    def step(self) -> None:
        """Push each server its slice of the gradient (worker ranks, inside ``fit``)."""
        if not isinstance(self._role, Worker):
            raise RuntimeError(_NEEDS_FIT)
        self._role.step()

    def state_dict(self) -> dict[str, Any]:
        """Rank 0, at a checkpoint: every server's optimizer state and version, the clocks, the records."""
        return self._role.keep if isinstance(self._role, Server) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's state for ``fit`` to restore."""
        self.resumed = state

    def close(self) -> None:
        """Nothing to release: every request is complete when ``fit`` returns (the duplicated communicator goes
        with MPI at exit; freeing it would be a collective that an excluded rank could never join)."""
        self._fitting = False
