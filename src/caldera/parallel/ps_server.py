"""The server ranks of async-ps: each owns a contiguous shard of the flattened parameters and an optimizer over
it, answers pushes from any worker in arrival order within the staleness bound, declares silent workers dead,
takes the checkpoint cut with the other servers, and (server 0) hands out the work and finishes the run.
See ``param_server`` for the protocol as a whole, ``ps_wire`` for the messages.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from caldera.checkpoint import Preempted
from caldera.comm.buckets import flatten, unflatten
from caldera.log import get_logger
from caldera.parallel import _async
from caldera.parallel._async import Schedule
from caldera.parallel.context import RunContext, Snapshot, UpdateBar
from caldera.parallel.ps_wire import (
    BUFFERS,
    CUT,
    DONE,
    FINAL,
    PARK,
    PUSH,
    REPLY,
    STOP,
    WEIGHTS,
    Job,
    Packet,
    mpi,
)

_log = get_logger(__name__)


class Server:
    """One server rank: its shard, its optimizer, its view of every worker (clock, state) and its records."""

    def __init__(self, job: Job, ctx: RunContext, params: list[torch.nn.Parameter], buffers: list[torch.Tensor],
                 optimizer: tuple[type, dict[str, Any]], servers_comm: Any, resumed: dict[str, Any],
                 max_staleness: int | None, dead_timeout: float, schedule: Schedule | None) -> None:  # fmt: skip
        self.job, self.ctx, self.checkpointer = job, ctx, ctx.checkpointer
        self.comm, self.rank, self.servers, self.n_workers = job.comm, job.rank, job.servers, job.n_workers
        self.bounds, self.items, self._every = job.bounds, job.items, job.every
        self.poll_s, self.pipeline = job.poll_s, job.pipeline
        self.max_staleness, self.dead_timeout, self._schedule = max_staleness, dead_timeout, schedule
        self._params, self._buffers, self._servers_comm = params, buffers, servers_comm
        self._resumed_state = resumed
        start, stop = self.bounds[self.rank]
        self.shard = torch.nn.Parameter(flatten(params)[start:stop].clone())
        opt_class, settings = optimizer
        self.optimizer = opt_class([self.shard], **settings)
        if resumed:
            self.optimizer.load_state_dict(resumed["optimizers"][self.rank])
        self.keep: dict[str, Any] = {}  # rank 0: the strategy's state in the checkpoint being written
        self.stats: dict[str, Any] = {}
        # Recorded: (worker, its clock, version it read, version it was applied to, seconds into training) per
        # push, and (worker, its clock, the slowest live worker's clock) per reply.
        self.applied_log: list[tuple[int, int, int, int, float]] = []
        self.reply_log: list[tuple[int, int, int]] = []

    def serve(self, bar: UpdateBar | None) -> None:
        """Answer pushes from any worker, in arrival order, until every worker is done (or declared dead);
        ``bar``: rank 0's progress bar over the updates applied."""
        MPI, W, n = mpi(), self.n_workers, self.shard.numel()
        resumed = self._resumed_state
        self._bar = bar
        self._inbox = [Packet(n) for _ in range(W)]
        self._outbox = [Packet(n) for _ in range(W)]
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
            self.applied_log.append((i, clock, read, self.version, time.monotonic() - self.job.t0))
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
        self.snapshots.append(
            Snapshot(self.applied, time.monotonic() - self.job.t0, self.shard.detach().clone())
        )

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
                self.dead.append((self.servers + i, now - self.job.t0))
                if self.rank == 0:
                    _log.warning(f"async-ps: worker rank {self.servers + i} silent for more than "
                                 f"{self.dead_timeout:g} s: training continues without it")  # fmt: skip
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
            self.keep = self._checkpoint_state(everyone, step, self._assemble(everyone))
        path = _async.save(self.ctx, step, self.items)
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
            "train_s": time.monotonic() - self.job.t0, **_async.saved_records(snapshots),
        }  # fmt: skip

    def _drain(self) -> None:
        """Leave no request behind: cancel the receives still posted (a message that slipped in is used)."""
        MPI = mpi()
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

    def finish(self, val_set: Dataset | None) -> list[dict[str, float]] | None:
        """Agree on who finished, assemble the recorded shards on rank 0, evaluate, write, send the result; return
        rank 0's history (None on the other servers, which then receive it like the workers)."""
        MPI = mpi()
        if not self.snapshots or self.snapshots[-1].items != self.applied:  # items lost to dead workers
            self._snapshot()
        servers = self._servers_comm
        done = np.array([s == "done" for s in self.state], dtype=np.int32)
        servers.Allreduce(MPI.IN_PLACE, done, op=MPI.MIN)  # a member finished with every server
        mine = {**self._shard_state(), "applied": self.applied_log, "replies": self.reply_log,
                "dead": self.dead, "refused": self.refused, "delayed": self.delayed}  # fmt: skip
        everyone = servers.gather(mine, root=0)
        if self.rank != 0:
            return None
        self.snapshots = self._assemble(everyone)
        self.stats = self._summary(everyone, done)
        self._average_worker_buffers(done)
        self.ctx.log(f"async-ps: {self.stats['updates']} updates in {self.stats['train_s']:.2f} s (per worker "
                    f"{self.stats['updates_per_worker']}); staleness mean {self.stats['staleness_mean']:.2f}, "
                    f"max {self.stats['staleness_max']}; replies held back {self.stats['delayed_replies']}")  # fmt: skip
        lr = (lambda item: self._schedule.lr(0, item)) if self._schedule else None
        history = self.ctx.report(self.snapshots, val_set, self.items.per_epoch, self.stats, lr)
        missing = [self.servers + i for i in range(self.n_workers) if not done[i]]
        # The end of the run is checkpointed like the trainer's, by every rank together: not with a rank missing.
        checkpoint = self.checkpointer is not None and not missing
        final = {"weights": self.snapshots[-1].weights, "buffers": [b.cpu() for b in self._buffers],
                 "history": history, "stats": self.stats, "checkpoint": checkpoint, "step": self.applied}  # fmt: skip
        members = [
            r for r in range(1, self.servers + self.n_workers) if r < self.servers or done[r - self.servers]
        ]
        for r in members:
            self.comm.send(final, dest=r, tag=FINAL)
        if checkpoint:
            self.keep = self._checkpoint_state(everyone, self.applied, self.snapshots)
            unflatten(final["weights"], self._params)  # the model the run ends with (last snapshot)
            _async.save(self.ctx, self.applied, self.items)
        if missing:
            self.ctx.world.abort(f"async-ps: worker rank(s) {missing} went silent and never came back; training "
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
