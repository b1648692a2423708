"""A simulation and a trainer on different ranks of one MPI job, samples and weights sent between them over MPI.

    mpiexec -n 8 python simulation.py : -n 2 python train.py      (one job, two programs: MPMD)

Both programs call ``connect(role)`` once, first. Simulation rank i feeds trainer rank i mod (trainers); each
trainer sends its model back to its simulation ranks with ``publish``, so a surrogate inside the simulation improves
while it runs. Arrays travel as MPI buffers (one small pickled header per message); no files, no server, no
database in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from caldera.comm.mpi import MPIComm
from caldera.world import World, abort_on_uncaught_exception, init

ROLES = ("simulation", "trainer")
_SAMPLES, _X, _Y, _WEIGHTS, _WEIGHT_BYTES = (
    701,
    702,
    703,
    704,
    705,
)  # message tags on the link's own communicator


def connect(role: str, max_pending: int = 8) -> SimulationLink | TrainerLink:
    """Join the coupled job as ``"simulation"`` or ``"trainer"`` (collective over every process of the job).

    ``max_pending``: sample batches a simulation rank may have in flight before ``send`` waits for its trainer
    (back-pressure instead of unbounded memory when the trainer is slower)."""
    from mpi4py import MPI

    job = MPI.COMM_WORLD
    roles = job.allgather(role)
    unknown = sorted({r for r in roles if r not in ROLES}, key=str)
    sims = [r for r, name in enumerate(roles) if name == "simulation"]
    trainers = [r for r, name in enumerate(roles) if name == "trainer"]
    if unknown:
        raise ValueError(f"connect(): unknown role(s) {unknown}; each process is 'simulation' or 'trainer'")
    if not sims or not trainers or len(trainers) > len(sims):
        raise ValueError(
            f"connect(): the job has {len(sims)} simulation and {len(trainers)} trainer rank(s); it needs at least "
            "one of each and no more trainers than simulation ranks, e.g. "
            "`mpiexec -n 4 python simulation.py : -n 2 python train.py`"
        )
    # An exception left uncaught in either program ends the whole job: otherwise the other program would wait
    # for messages that never come (and the failed process itself would hang in MPI_Finalize).
    abort_on_uncaught_exception(World(rank=job.Get_rank(), size=job.Get_size(), comm=MPIComm(job)))
    mine = job.Split(ROLES.index(role), job.Get_rank())  # the ranks of this program only
    link = job.Dup()  # point-to-point traffic kept apart from the user's own messages
    if role == "simulation":
        return SimulationLink(link, mine, trainers[sims.index(job.Get_rank()) % len(trainers)], max_pending)
    producers = [s for i, s in enumerate(sims) if i % len(trainers) == trainers.index(job.Get_rank())]
    return TrainerLink(link, init(comm=mine), producers)


class SimulationLink:
    """The simulation side: ``send`` samples to this rank's trainer, ``refresh`` a model with its newest weights."""

    def __init__(self, link: Any, comm: Any, trainer: int, max_pending: int) -> None:
        self.link, self.trainer, self.max_pending = link, trainer, max_pending
        self.comm = (
            comm  # the simulation ranks' own communicator (for the solver's halo exchanges, reductions)
        )
        self.sent = 0  # samples sent so far
        self.version = 0  # how many weight updates were loaded
        self._pending: list[tuple[list[Any], tuple[np.ndarray, ...]]] = []
        self._closed = False

    def send(self, x: Any, y: Any) -> None:
        """Send a batch of samples (first dimension = samples; NumPy or torch) to the trainer. The arrays are
        copied, so the simulation may overwrite its own at once; waits only when ``max_pending`` are in flight."""
        xs, ys = _array(x), _array(y)
        if len(xs) != len(ys):
            raise ValueError(f"send() got {len(xs)} inputs but {len(ys)} targets; give one target per input")
        header = {"n": len(xs), "x": (xs.shape, xs.dtype.str), "y": (ys.shape, ys.dtype.str)}
        # Issend completes only once the trainer has taken the batch, so max_pending bounds what waits unread
        # (a plain Isend of a small message completes at once, and the trainer's memory would take the excess).
        requests = [self.link.isend(header, self.trainer, _SAMPLES), self.link.Issend(xs, self.trainer, _X),
                    self.link.Isend(ys, self.trainer, _Y)]  # fmt: skip
        self._pending.append((requests, (xs, ys)))  # the buffers live until MPI is done with them
        self.sent += len(xs)
        self._pending = [p for p in self._pending if not _done(p[0])]
        while len(self._pending) > self.max_pending:  # back-pressure: the trainer is behind
            _wait(self._pending.pop(0)[0])

    def refresh(self, model: torch.nn.Module) -> bool:
        """Load the newest weights the trainer published into ``model``, if any arrived; never waits."""
        newest = None
        while self.link.Iprobe(self.trainer, _WEIGHTS):
            header, state = self._receive_weights()
            if header.get("final"):
                raise RuntimeError(
                    "refresh() after the trainer said goodbye to this rank (close() was called)"
                )
            newest = state
        if newest is None:
            return False
        model.load_state_dict(newest)
        self.version += 1
        return True

    def close(self) -> None:
        """Tell the trainer this rank sends no more, wait for the samples in flight, take the trainer's last
        messages (collective with the trainer's ``close``)."""
        if self._closed:
            return
        self._closed = True
        self.link.isend({"close": True}, self.trainer, _SAMPLES).wait()
        for requests, _ in self._pending:
            _wait(requests)
        self._pending.clear()
        while not self._receive_weights()[0].get("final"):  # weights still on their way: take and drop them
            pass

    def _receive_weights(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        header = self.link.recv(source=self.trainer, tag=_WEIGHTS)
        if header.get("final"):
            return header, None
        payload = np.empty(header["bytes"], dtype=np.uint8)
        self.link.Recv(payload, source=self.trainer, tag=_WEIGHT_BYTES)
        return header, _unpack(payload, header["layout"])

    def __enter__(self) -> SimulationLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainerLink:
    """The trainer side: ``receive`` samples from this rank's simulation ranks, ``publish`` the model to them."""

    def __init__(self, link: Any, world: World, producers: list[int]) -> None:
        self.link, self.world = link, world  # world: the trainer ranks only, for OnlineTrainer(world=...)
        self.producers = producers  # job ranks of the simulation ranks that feed this trainer rank
        self.open = set(producers)
        self.received = 0  # samples received so far
        self._weights: dict[int, tuple[list[Any], np.ndarray]] = {}  # per simulation rank: the copy in flight
        self._goodbyes: list[Any] = []

    def receive(self, block: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """Return every sample that has arrived, concatenated; with ``block``, wait until at least one batch
        arrives or every simulation rank of this trainer has closed. None when nothing came."""
        from mpi4py import MPI

        xs, ys = [], []
        status = MPI.Status()
        while self.open:
            if not self.link.Iprobe(MPI.ANY_SOURCE, _SAMPLES, status):
                if xs or not block:
                    break
                self.link.Probe(MPI.ANY_SOURCE, _SAMPLES, status)
            batch = self._receive_from(status.Get_source())
            if batch is not None:
                xs.append(batch[0])
                ys.append(batch[1])
        if not xs:
            return None
        x, y = (np.concatenate(a) if len(a) > 1 else a[0] for a in (xs, ys))
        self.received += len(x)
        return x, y

    def active(self) -> bool:
        """Whether any simulation rank of the job still sends (collective over the trainer ranks)."""
        return any(self.world.comm.allgather(bool(self.open)))

    def publish(self, model: torch.nn.Module) -> int:
        """Send the model's weights to this trainer's simulation ranks that are still running and have taken the
        previous ones (at most one copy in flight per rank, however rarely it refreshes); not collective: under a
        data-parallel strategy every trainer rank holds the same weights. Return how many ranks it went to."""
        payload, layout = None, None
        sent = 0
        for rank in sorted(self.open):
            if rank in self._weights and not _done(self._weights[rank][0]):
                continue  # that rank has not taken the last copy yet: it gets a newer one next time
            if payload is None:
                payload, layout = _pack(model.state_dict().items())
            header = {"bytes": payload.nbytes, "layout": layout}
            requests = [
                self.link.isend(header, rank, _WEIGHTS),
                self.link.Isend(payload, rank, _WEIGHT_BYTES),
            ]
            self._weights[rank] = (requests, payload)  # the buffer lives until MPI is done with it
            sent += 1
        return sent

    def close(self) -> None:
        """Wait until every simulation rank of this trainer has closed (samples still arriving are dropped:
        ``receive`` them first while ``active()``), and until all weights sent are taken."""
        while self.open:
            self.receive()
        for requests, _ in self._weights.values():
            _wait(requests)
        _wait(self._goodbyes)
        self._weights.clear()
        self._goodbyes.clear()

    def _receive_from(self, source: int) -> tuple[np.ndarray, np.ndarray] | None:
        header = self.link.recv(source=source, tag=_SAMPLES)
        if header.get("close"):
            self.open.discard(source)
            # The last message to that rank: after it, it stops listening for weights.
            self._goodbyes.append(self.link.isend({"final": True}, source, _WEIGHTS))
            return None
        out = []
        for tag, key in ((_X, "x"), (_Y, "y")):
            shape, dtype = header[key]
            buf = np.empty(shape, dtype=np.dtype(dtype))
            self.link.Recv(buf, source=source, tag=tag)
            out.append(buf)
        return out[0], out[1]

    def __enter__(self) -> TrainerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _array(a: Any) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().numpy()
    out = np.array(a, copy=True, order="C")
    if out.ndim == 0:
        raise ValueError("send(): give a batch (first dimension = samples), not a scalar")
    return out


def _pack(items: Iterable[tuple[str, torch.Tensor]]) -> tuple[np.ndarray, list[tuple[str, tuple, str]]]:
    """A state dict as one byte buffer and the (name, shape, dtype) layout to rebuild it."""
    tensors = [(name, t.detach().cpu().contiguous()) for name, t in items]
    layout = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors]
    flat = [t.reshape(-1).view(torch.uint8) for _, t in tensors]
    return (torch.cat(flat).numpy() if flat else np.empty(0, np.uint8)), layout


def _unpack(payload: np.ndarray, layout: list[tuple[str, tuple, str]]) -> dict[str, torch.Tensor]:
    data, state, at = torch.from_numpy(payload), {}, 0
    for name, shape, dtype in layout:
        dt = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dt).element_size()
        state[name] = data[at : at + n].clone().view(dt).reshape(shape)  # a copy: aligned for its dtype
        at += n
    return state


def _done(requests: list[Any]) -> bool:
    from mpi4py import MPI

    return MPI.Request.Testall(requests)


def _wait(requests: list[Any]) -> None:
    from mpi4py import MPI

    MPI.Request.Waitall(requests)
