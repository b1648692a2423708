"""Asynchronous SGD on one node, MagmaDNN/Hogwild style: worker processes share one copy of the weights and
update it without ever waiting for each other.

MagmaDNN's answer to jitter at scale is to stop synchronising (Lopez, Chow, Tomov, Dongarra 2020): workers
update shared weights with dense gradients and no global barrier, so a slow worker delays nobody. The price is
staleness: a gradient is computed on weights that other workers change before it lands.

How a run goes (``fit``: the trainer hands the whole run to this strategy, in the one process the user started):
1. The weights move to shared memory (``model.share_memory()``) and ``workers`` processes start with
   ``forkserver`` (or ``spawn``), never ``fork``, which breaks MPI and CUDA state in the child.
2. Each worker takes the next work item (a worker-sized slice of a global batch, ``_async.WorkItems``) from a
   shared counter, notes the shared version counter (its *read*), computes a dense gradient into its own private
   ``.grad`` tensors, and applies its optimizer step straight to the shared weights: lock-free (``lock =
   "none"``, Hogwild: two workers may interleave their writes to one tensor, so an update can be partly
   overwritten) or under a short per-tensor lock (``lock = "tensor"``: no update is lost; a worker waits at most
   for one other worker's write of one tensor). Reads never lock.
3. It then increments the version counter (its *write*). Staleness = write - read - 1: how many other workers'
   updates landed between reading the weights and writing the update. A shared histogram records it.
No barrier anywhere: a slow worker simply takes fewer items, and the fast ones keep the run going.

Checkpoints (``[checkpoint] every``, a time limit, SIGTERM/SIGUSR1 to the main process): the main process asks
the workers to pause; each finishes the item in hand, sends its optimizer state and waits. Then every item
handed out has been applied -- a consistent cut -- and the main process saves the shared weights, every
worker's optimizer state and the records through the trainer's checkpointer, and lets the workers go on (or,
when stopping, exits with the requeue code). Workers ignore SIGTERM/SIGUSR1 (the main process decides) and
leave when the main process dies.

Every worker keeps its own optimizer state (momentum, Adam moments) and steps with the item's gradient scaled
by (slice size / global batch). For SGD with momentum the W workers' buffers then add up, to first order in the
staleness, to synchronous SGD over the global batch. Adam normalises the gradient, so W workers take W Adam
steps per global batch: lower an Adam learning rate by about W.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from caldera.checkpoint import Preempted
from caldera.comm.buckets import flatten
from caldera.config import StrategyOptions
from caldera.names import NOT_COMPILED
from caldera.parallel import _async
from caldera.parallel._async import WorkItems, check_run
from caldera.parallel.base import Strategy, register
from caldera.parallel.context import RunContext, Snapshot, trainable
from caldera.world import World

STALENESS_BINS = 256  # the histogram's last bin collects everything staler
_NEEDS_FIT = ("async-shared runs its own worker processes: the trainer must hand it the run through "
              "strategy.fit(ctx, train_set, val_set) (Trainer.fit does so for strategies that run their own loop)")  # fmt: skip


_UNGUARDED = (
    "caldera: error: async-shared starts worker processes that import the main script again, and this "
    'script starts training when imported: put the training code under `if __name__ == "__main__":`'
)


def check_main_is_guarded() -> None:
    """Refuse (one line, SystemExit) a run started by a script's top-level code outside ``if __name__ ==
    "__main__":``: each worker would re-run it while importing the script and die of multiprocessing's error."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(_UNGUARDED)  # a worker importing the script: the parent's check below was fooled
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return  # an interactive session or notebook: the workers do not import it
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return  # not started by the script's own code (a thread, say): nothing to re-run in the workers
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return  # no source to look at (a frozen or compiled main): let multiprocessing speak
    if not _guarded(tree.body, frame.f_lineno):
        raise SystemExit(_UNGUARDED)


def _guarded(body: list[ast.stmt], line: int) -> bool:
    """Whether ``line`` of a module lies inside an ``if __name__ == "__main__":`` block."""
    for node in body:
        if not node.lineno <= line <= (node.end_lineno or node.lineno):
            continue
        if (
            isinstance(node, ast.If)
            and _is_main_test(node.test)
            and any(c.lineno <= line <= (c.end_lineno or c.lineno) for c in node.body)
        ):
            return True
        return any(_guarded(getattr(node, f, []), line) for f in ("body", "orelse", "handlers", "finalbody"))
    return False


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(mains) == 1


class AsyncSharedOptions(StrategyOptions):
    """``[parallel]`` keys of strategy ``async-shared``."""

    workers: int = Field(2, ge=1, description="worker processes on this node")
    lock: Literal["none", "tensor"] = Field("none", description="lock-free or per-tensor locks")


@register("async-shared")
class AsyncShared(Strategy):
    """Several processes on one node train one shared model with no barrier (lock-free or per-tensor locks)."""

    Options = AsyncSharedOptions

    runs_own_loop = True  # worker processes of its own: fit() drives the run
    not_compiled = NOT_COMPILED["async-shared"]

    def __init__(
        self,
        *,
        workers: int = 2,
        lock: str = "none",
        threads_per_worker: int | None = None,
        start_method: str | None = None,
        record_every: int | None = None,
        grad_clip: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"async-shared needs at least 1 worker (got workers = {workers})")
        if lock not in ("none", "tensor"):
            raise ValueError(
                f"unknown lock {lock!r}; use 'none' (lock-free, Hogwild) or 'tensor' (per-tensor locks)"
            )
        self.workers, self.lock, self.grad_clip = workers, lock, grad_clip
        self.threads_per_worker, self.record_every = threads_per_worker, record_every
        self.start_method = start_method or ("forkserver" if os.name == "posix" else "spawn")
        self.stats: dict[str, Any] = {}  # filled by fit: updates per worker, staleness summary, timings
        self.snapshots: list[Snapshot] = []
        self.resumed: dict[str, Any] = {}  # the state a checkpoint held, when the run resumes
        self._fitting = False

    # -- the run, in the process the user started -------------------------------------------------------------
    def fit(self, ctx: RunContext, train_set: Dataset, val_set: Dataset | None) -> list[dict[str, float]]:
        """Train ``ctx.model`` with ``workers`` processes; hand the recorded weights to ``ctx.report``."""
        import torch.multiprocessing as mp  # registers torch's shared-memory pickling of tensors

        check_run(ctx, "async-shared")
        check_main_is_guarded()
        self._fitting = True
        ckpt = ctx.checkpointer
        if ckpt is not None:
            ckpt.install_signal_handlers()
        try:
            return self._fit(ctx, train_set, val_set, mp)
        finally:
            if ckpt is not None:
                ckpt.restore_signal_handlers()
            self.close()

    def _fit(
        self, ctx: RunContext, train_set: Dataset, val_set: Dataset | None, mp
    ) -> list[dict[str, float]]:
        self.setup(ctx.model, ctx.optimizer, ctx.world)
        resumed, _ = _async.restore(ctx, lambda: self.resumed, "async-shared")  # into the shared tensors
        self.resumed = {}  # the workers get a copy of this object: leave the records out of it
        if resumed and resumed["workers"] != self.workers:
            raise _async.config_error(f"the checkpoint was written by {resumed['workers']} async-shared workers; "
                                      f"resume with [parallel] workers = {resumed['workers']}")  # fmt: skip
        # A user's step (a StepFn, picklable when its function is importable) takes the batch whole.
        self.loss_fn, self.precision, self.accumulate = ctx.step or ctx.loss_fn, ctx.precision, ctx.accumulate
        self._schedule = _async.schedule_of(ctx, self.workers)  # applied per item by the workers
        self.items = WorkItems(train_set, ctx.batch_size, self.workers, ctx.max_epochs, ctx.seed,
                               ctx.shuffle, ctx.drop_last, whole=ctx.step is not None)  # fmt: skip
        self._every = self.record_every or self.items.per_epoch
        n_records = math.ceil(self.items.total / self._every)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._threads = self.threads_per_worker or max(1, cores // self.workers)

        mpc = mp.get_context(self.start_method)  # the processes' context (not the run's ctx)
        if self.start_method == "forkserver":  # import torch once in the fork server, not once per worker
            mpc.set_forkserver_preload(["torch", __name__])
        start = self._start = resumed.get("updates", 0)
        self._version = mpc.Value("q", start)  # updates applied so far: the weights' version
        self._next_item = mpc.Value("q", start)  # the next work item to hand out
        self._ready = mpc.Value("q", 0)
        self._pause = mpc.Value("q", 0)  # > 0: the number of the checkpoint the workers should pause for
        self._go = mpc.Event()
        self._states = mpc.Queue()  # (worker, pause number or -1 at the end, its optimizer state as bytes)
        self._locks = [mpc.Lock() for _ in self._params] if self.lock == "tensor" else None
        self._staleness = torch.zeros(self.workers, STALENESS_BINS, dtype=torch.int64).share_memory_()
        self._stale_max = torch.zeros(self.workers, dtype=torch.int64).share_memory_()
        self._losses = torch.zeros(self.workers, n_records, 2, dtype=torch.float64).share_memory_()
        self._snapshots = torch.zeros(n_records, sum(p.numel() for p in self._params)).share_memory_()
        self._snap_time = torch.zeros(n_records, dtype=torch.float64).share_memory_()
        # Each worker loads its own optimizer (and fp16 loss-scaler) state on start.
        self._worker_optim, self._worker_precision = resumed.get("optimizers"), resumed.get("precisions")
        self._restore_records(resumed)

        ctx.log(f"async-shared: {self.workers} worker processes x {self._threads} thread(s), lock = "
                f"{self.lock}; {self.items.total} updates of {ctx.batch_size // self.workers} samples "
                f"({ctx.max_epochs} epochs of {len(train_set)} samples)"
                + (f"; resuming after update {start}" if start else ""))  # fmt: skip
        procs = [mpc.Process(target=_worker_main, args=(self, i), daemon=True, name=f"caldera-async-{i}")
                 for i in range(self.workers)]  # fmt: skip
        self._optim_states: dict[int, tuple[int, bytes]] = {}  # worker -> (pause number or -1, state)
        self._pauses = 0
        try:
            started = time.monotonic()
            for p in procs:
                p.start()
            self._watch(procs, lambda: self._ready.value == self.workers)
            self.t0 = time.monotonic()
            self._go.set()  # all workers start together: startup is not training time
            self._train(procs, ctx)
            elapsed = time.monotonic() - self.t0
        finally:
            for p in procs:
                if p.pid is None:  # never started (start() of an earlier one failed)
                    continue
                if p.is_alive():
                    p.kill()  # the workers ignore SIGTERM (the main process decides when to stop)
                p.join()
        self.snapshots = self._collect(n_records)
        self.stats = self._summary(elapsed + self._offset, self.t0 - started)
        ctx.log(f"async-shared: {self.stats['updates']} updates in {elapsed:.2f} s (per worker "
                f"{self.stats['updates_per_worker']}); staleness mean {self.stats['staleness_mean']:.2f}, "
                f"p99 {self.stats['staleness_p99']}, max {self.stats['staleness_max']}")  # fmt: skip
        lr = (lambda item: self._schedule.lr(0, item)) if self._schedule else None
        history = ctx.report(self.snapshots, val_set, self.items.per_epoch, self.stats, lr)
        if ctx.checkpointer is not None:  # the end of the run, like the trainer's final checkpoint
            self._keep = self._checkpoint_state(self._version.value, final=True)
            _async.save(ctx, self._version.value, self.items)
        return history

    def _train(self, procs: list, ctx: RunContext) -> None:
        """Wait for the workers to use up the items; pause them for a checkpoint when one is due or asked for."""
        ckpt = ctx.checkpointer
        with ctx.progress_bar(self.items.total) as bar:  # rank 0's rich bar, over updates
            while not all(p.exitcode == 0 for p in procs):
                self._check(procs)
                self._drain_states()
                if ckpt is not None and self._next_item.value < self.items.total:
                    due, stop = ckpt.poll(self._version.value)
                    if due or stop:
                        self._checkpoint(procs, ctx, stop)
                if bar is not None:
                    bar.show(self._version.value, self.items.per_epoch, self._running_loss())
                time.sleep(0.01)
        self._drain_states(until=lambda: self._states_for(-1), procs=procs)

    def _where(self, item: int) -> str:
        epoch, step, part = self.items.locate(item)
        return f"work item {item} (epoch {epoch + 1}, step {step}, slice {part}) on worker {self.index}"

    def _running_loss(self) -> float:
        """The mean loss of the current record's updates so far (what the progress bar shows)."""
        record = max(0, (self._version.value - 1) // self._every)
        loss_sum, samples = self._losses[:, record].sum(0).tolist()
        return loss_sum / samples if samples else float("nan")

    def _states_for(self, number: int) -> bool:
        """True once every worker sent its optimizer state for pause ``number`` (or its final one, -1)."""
        states = self._optim_states.values()
        return len(states) == self.workers and all(g in (number, -1) for g, _ in states)

    def _checkpoint(self, procs: list, ctx: RunContext, stop: str | None) -> None:
        """Pause every worker at an item boundary, save, then resume them (or stop, asking for a requeue)."""
        self._pauses += 1
        number = self._pause.value = self._pauses
        self._drain_states(until=lambda: self._states_for(number), procs=procs)
        updates = self._version.value  # every item handed out has been applied: a consistent cut
        self._keep = self._checkpoint_state(updates)
        path = _async.save(ctx, updates, self.items)
        if stop:
            raise Preempted(stop, path)
        self._pause.value = 0

    def _drain_states(self, until=None, procs: list | None = None) -> None:
        """Collect the optimizer states the workers sent; with ``until``, wait for it (watching the workers)."""
        import queue

        while True:
            try:
                index, number, blob = self._states.get(timeout=0.01 if until else 0)
                self._optim_states[index] = (number, blob)
            except queue.Empty:
                if until is None or until():
                    return
                self._check(procs or [])

    def _check(self, procs: list) -> None:
        """A worker that died ends the run with its name instead of a hang."""
        for i, p in enumerate(procs):
            if p.exitcode not in (None, 0):
                why = (f"was killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
                       else "raised an error (its traceback is above)")  # fmt: skip
                raise RuntimeError(f"async-shared worker {i} died with exit code {p.exitcode}: it {why}; the run is "
                                   "stopped, checkpoints already written are kept (--resume continues from the "
                                   "newest)")  # fmt: skip

    def _watch(self, procs: list, done) -> None:
        """Wait until ``done()``, watching the workers."""
        while not done():
            self._check(procs)
            time.sleep(0.01)

    def _checkpoint_state(self, updates: int, final: bool = False) -> dict[str, Any]:
        """What a checkpoint holds beyond the trainer's state: every worker's optimizer state and the records."""
        n_records = math.ceil(updates / self._every) if final else updates // self._every
        # The workers' optimizer and loss-scale states are tensors and plain numbers: weights_only reads them all
        # and would refuse anything else that reached the queue.
        blobs = [
            torch.load(io.BytesIO(self._optim_states[i][1]), weights_only=True) for i in range(self.workers)
        ]
        return {
            "strategy": "async-shared", "workers": self.workers, "updates": updates,
            "optimizers": [blob["optimizers"] for blob in blobs],
            "precisions": [blob["precision"] for blob in blobs],
            "train_s": time.monotonic() - self.t0 + self._offset,
            "staleness": self._staleness.clone(), "stale_max": self._stale_max.clone(),
            "losses": self._losses.sum(0), **_async.saved_records(self._collect(n_records)),
        }  # fmt: skip

    def _restore_records(self, state: dict[str, Any]) -> None:
        """Put a checkpoint's records back into the shared tensors (times continue from the saved run)."""
        restored = _async.records_from(state)
        self._offset, self._restored_times = state.get("train_s", 0.0), [s.time_s for s in restored]
        for r, snap in enumerate(restored):
            self._snapshots[r] = snap.weights
        if state:
            self._staleness.copy_(state["staleness"])
            self._stale_max.copy_(state["stale_max"])
            self._losses[0].copy_(state["losses"])

    def _collect(self, n_records: int) -> list[Snapshot]:
        losses = self._losses.sum(0)
        return [Snapshot(items=min((r + 1) * self._every, self.items.total),
                         time_s=(self._restored_times[r] if r < len(self._restored_times)
                                 else float(self._snap_time[r]) - self.t0 + self._offset),
                         weights=self._snapshots[r].clone(),
                         loss_sum=float(losses[r, 0]), samples=int(losses[r, 1]))
                for r in range(n_records)]  # fmt: skip

    def _summary(self, elapsed: float, startup: float) -> dict[str, Any]:
        hist = self._staleness.sum(0)
        n = int(hist.sum())
        cumulative = hist.cumsum(0)

        def quantile(q: float) -> int:
            return int(torch.searchsorted(cumulative, torch.tensor(math.ceil(q * n))).item())

        return {
            "strategy": "async-shared", "workers": self.workers, "lock": self.lock, "updates": n,
            "resumed_from": self._start,
            "updates_per_worker": self._staleness.sum(1).tolist(),
            "staleness_mean": float((hist * torch.arange(STALENESS_BINS)).sum()) / max(1, n),
            "staleness_p50": quantile(0.5), "staleness_p99": quantile(0.99),
            "staleness_max": int(self._stale_max.max()),
            "staleness_histogram": {int(s): int(hist[s]) for s in hist.nonzero().flatten()},
            "train_s": elapsed, "startup_s": startup,
        }  # fmt: skip

    # -- the strategy protocol: setup in the parent, backward and step inside each worker --------------------
    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Move the weights to shared memory and note the optimizer's settings (each worker builds its own)."""
        if not self._fitting:
            raise RuntimeError(_NEEDS_FIT)
        if world.size > 1:
            raise _async.config_error("async-shared runs on one node from one process (it starts its own workers); "
                             "start it without mpiexec or torchrun, or use strategy = 'async-ps' across ranks")  # fmt: skip
        self._params = trainable(model)
        if any(p.device.type != "cpu" for p in self._params):
            raise _async.config_error(
                "async-shared shares CPU memory between processes; keep the model on the CPU"
            )
        model.zero_grad(set_to_none=True)  # gradients must stay private to each worker, never shared
        model.share_memory()
        self.model = model
        # One optimizer per tensor in each worker: the per-tensor lock then covers exactly one tensor's update.
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a precision wrapper's inner optimizer
        self._opt_class = type(optimizer)
        settings = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._group = [group_of[id(p)] for p in self._params]  # which schedule entry each tensor follows
        self._opt_settings = [{k: v for k, v in settings[id(p)].items() if k in optimizer.defaults}
                              for p in self._params]  # fmt: skip
        return model

    def _work(self, index: int) -> None:
        """One worker's life: take items until none are left; never wait for another worker."""
        os.environ["CALDERA_WORKER_INDEX"] = str(index)  # lets user code tell the workers apart
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the main process checkpoints and stops us
            signal.signal(sig, signal.SIG_IGN)
        self._parent = os.getppid()
        torch.set_num_threads(self._threads)
        self.index = index
        self._optimizers = [self._opt_class([p], **s) for p, s in zip(self._params, self._opt_settings)]
        for optimizer, state in zip(self._optimizers, (self._worker_optim or [[]] * self.workers)[index]):
            optimizer.load_state_dict(state)
        if self._worker_precision:
            self.precision.load_state_dict(self._worker_precision[index])
        self._guards = self._locks or [contextlib.nullcontext()] * len(self._params)
        with self._ready.get_lock():
            self._ready.value += 1
        self._go.wait()
        self.model.train()
        while True:
            if self._pause.value:
                self._hold()
            with self._next_item.get_lock():
                item = self._next_item.value
                self._next_item.value += 1
            if item >= self.items.total:
                self._send_state(-1)  # the final optimizer state, for the end-of-run checkpoint
                return
            if os.getppid() != self._parent:  # the main process was killed: stop burning its cores
                os._exit(1)
            x, y, n_local, n_global = self.items.batch(item)
            self._item = item
            self._read = self._version.value  # the version of the weights this forward pass reads
            loss = _async.compute_item(self.precision, self.model, self.loss_fn, self._params, x, y,
                                       n_local / n_global, self.backward, self.accumulate,
                                       where=self._where(item))  # fmt: skip
            self.step()
            record = (self._write - 1) // self._every
            self._losses[index, record, 0] += loss.item() * n_local
            self._losses[index, record, 1] += n_local

    def _send_state(self, number: int) -> None:
        blob = io.BytesIO()
        torch.save({"optimizers": [o.state_dict() for o in self._optimizers],
                    "precision": self.precision.state_dict()}, blob)  # fmt: skip
        self._states.put((self.index, number, blob.getvalue()))

    def _hold(self) -> None:
        """Pause for checkpoint ``_pause``: hand the main process this worker's optimizer state, then wait."""
        self._send_state(self._pause.value)
        while self._pause.value:
            if os.getppid() != self._parent:  # the main process is gone: nobody will resume us
                os._exit(1)
            time.sleep(0.002)

    def backward(self, loss: torch.Tensor) -> None:
        """Compute this worker's dense gradient into its private ``.grad`` tensors."""
        loss.backward()

    def step(self) -> None:
        """Apply the update to the shared weights tensor by tensor (locked or not); count it; record staleness."""
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        for p, optimizer, guard, group in zip(self._params, self._optimizers, self._guards, self._group):
            if self._schedule is not None:
                optimizer.param_groups[0]["lr"] = self._schedule.lr(group, self._item)
            if p.grad is not None:
                with guard:
                    optimizer.step()
                p.grad = None
        with self._version.get_lock():
            self._version.value += 1
            self._write = self._version.value
        staleness = self._write - self._read - 1
        self._staleness[self.index, min(staleness, STALENESS_BINS - 1)] += 1
        self._stale_max[self.index] = max(int(self._stale_max[self.index]), staleness)
        if self._write % self._every == 0 or self._write == self.items.total:
            record = math.ceil(self._write / self._every) - 1
            flatten(self._params, out=self._snapshots[record])  # a copy taken while others may be writing
            self._snap_time[record] = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        """The state of the checkpoint being written: updates, every worker's optimizer state, the records."""
        return getattr(self, "_keep", {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's state for ``fit`` to restore (the weights are the trainer's model)."""
        self.resumed = state

    def close(self) -> None:
        """Drop the shared buffers (the workers have exited when ``fit`` returns)."""
        self._snapshots = self._losses = self._staleness = None  # type: ignore[assignment]
        self._states = None
        self._fitting = False


def _worker_main(strategy: AsyncShared, index: int) -> None:
    """Entry point of a worker process (module level, so that spawn/forkserver can import it)."""
    strategy._work(index)
