"""Model-parallel inference: one model's tensor shards on a group of ranks, for ``caldera predict/serve --tp N``.

Each rank of a group of ``tp`` builds the run's model on the meta device (no memory) and then gives it its tensors
one at a time from the run's weights, memory-mapped: its slice of every layer the tensor plan cuts (the run's
``[parallel] plan``, or the default plan of ``parallel/tensor.py``) and every other tensor whole. No rank ever holds
the whole model. The group's rank 0 (the leader) owns the input (the HTTP socket, the data loader) and the output:
for each batch it sends the followers a small header (the batch's shape), broadcasts the batch, and every rank runs
the same column- and row-parallel layers as training, whose all-reduces leave every rank the whole output.

Before broadcasting, the leader runs the batch through a meta-device copy of the model (shapes only, no memory, no
arithmetic): an input the model cannot take is refused on the leader alone, so a bad request never reaches the
followers. Should a rank still fail in a forward, the group agrees on it after the forward and the leader raises
the first rank's error; the group keeps running. Followers wait for the next header by polling with short sleeps
(an idle server costs no core) and mark the hang watchdog while idle, so a group stuck inside a forward (a stopped
or unreachable rank) ends the job after ``hang_timeout`` instead of hanging forever; a rank that dies ends the job
through the MPI launcher.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caldera.comm.base import Communicator, wait_yielding
from caldera.config import Config
from caldera.errors import ConfigError
from caldera.parallel.tensor import (
    LAYOUT,
    TensorParallel,
    materialize_shard,
    plan_layers,
    shards_reader,
    split_params,
    state_reader,
)
from caldera.registry import resolve as resolve_run
from caldera.train.run import build_model
from caldera.train.rundir import RunDir
from caldera.watchdog import Watchdog, hang_timeout_for
from caldera.world import World

_HEADER = 16  # int64 words: kind, number of dimensions, the shape (a batch of up to 14 dimensions)
_STOP, _BATCH = 0, 1
_TAG = 7401  # header messages on the group's communicator (its collectives never use tags)
_IDLE_SLEEP_S = 0.001  # longest sleep between polls of an idle follower: latency added to a request at most


def tensor_plan(cfg: Config) -> dict[str, str] | None:
    """The run's tensor plan: its ``[parallel] plan`` when it trained with strategy ``tensor``, else None (the
    default plan)."""
    if cfg.parallel.strategy != "tensor":
        return None
    return cfg.parallel.options.get("plan")


def split_group(world: World, tp: int) -> tuple[Communicator, int, int]:
    """(this rank's tensor-parallel group, its replica, the number of replicas): ranks ``r`` with equal
    ``r // tp`` hold one model (collective)."""
    if tp < 1 or world.size % tp:
        raise ConfigError(f"--tp {tp} must divide the {world.size} ranks (ranks = replicas x tp)")
    replica = world.rank // tp
    group = world.comm if tp == world.size else world.comm.split(replica, world.rank % tp)
    return group, replica, world.size // tp


def load_shard(run_dir: str | Path, cfg: Config, group: Communicator,
               device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module, TensorParallel]:  # fmt: skip
    """(this rank's shard of the run's model, ready to call on every rank of ``group`` alike; the whole model on
    the meta device, for checking inputs; the strategy routing the shard's layers through the group)."""
    files = RunDir(run_dir)
    with torch.device("meta"):
        model = build_model(cfg, weights=False)
        shapes = build_model(cfg, weights=False).eval()
    strategy = TensorParallel(tp=group.size, plan=tensor_plan(cfg))
    split = split_params(plan_layers(model, strategy.plan, group.size))
    if files.weights.is_file():
        # Memory-mapped: a rank reads the pages of its own slices (and of the layers every rank holds) only.
        state: Mapping[str, torch.Tensor] = torch.load(files.weights, "cpu", mmap=True, weights_only=True)
        extra = sorted(set(state) - set(model.state_dict()))
        if extra:
            raise ConfigError(f"{files.weights} does not fit this model: unexpected {extra[:5]}; the [model] name "
                              "and args must match the run that wrote it")  # fmt: skip
        read = state_reader(state, group.rank, group.size, str(files.weights))
    elif (files.weight_shards / LAYOUT).is_file():  # shard-wise: this rank's own file when the tp is the same
        read = shards_reader(files.weight_shards, group.rank, group.size)
    else:
        raise ConfigError(f"{run_dir} has no {files.weights.name}: give the run directory of a finished run")
    materialize_shard(model, split, group.rank, group.size, read, device)
    return strategy.shard(model.eval(), group), shapes, strategy


class GroupModel(nn.Module):
    """The leader's view of a group's model: calling it checks the input's shape, sends it to the group and
    returns the whole output (every rank computes its shard); ``stop()`` releases the followers."""

    def __init__(self, shard: nn.Module, shapes: nn.Module, group: Communicator, watchdog: Watchdog | None = None,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:  # fmt: skip
        super().__init__()
        self.shard, self.group, self.watchdog, self.autocast = shard, group, watchdog, autocast
        self._shapes = [shapes]  # a list, not a submodule: its meta tensors stay out of state_dict and .to()
        self.batches = 0
        self.dtype = next((p.dtype for p in shard.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for ``x`` (collective over the group, started by this, its leader)."""
        x = x.to(self.dtype).contiguous()
        if x.dim() > _HEADER - 2:
            raise ValueError(f"inputs of {x.dim()} dimensions: at most {_HEADER - 2} are sent to the group")
        # Shapes only (no arithmetic, no memory): a wrong input is refused before the group sees it. An operation
        # without a meta kernel leaves it to the group's agreement after the forward.
        with contextlib.suppress(NotImplementedError):
            self._shapes[0](x.to("meta"))
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:2] = torch.tensor([_BATCH, x.dim()])
        header[2 : 2 + x.dim()] = torch.tensor(x.shape)
        for r in range(1, self.group.size):
            wait_yielding(self.group.Isend(header, r, tag=_TAG))
        self.batches += 1
        return _run(self.shard, self.group, x, self.watchdog, self.batches, self.autocast)

    def stop(self) -> None:
        """Tell the followers to return from ``follow`` (the leader calls it once, after the last batch)."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        for r in range(1, self.group.size):
            wait_yielding(self.group.Isend(header, r, tag=_TAG))


def _run(shard: nn.Module, group: Communicator, x: torch.Tensor, watchdog: Watchdog | None, step: int,
         autocast: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:  # fmt: skip
    """Broadcast ``x`` from the leader, run this rank's shard, agree on success (collective over ``group``)."""
    if watchdog is not None:
        watchdog.mark("validation", step)
    group.Bcast(x, root=0)
    error: str | None = None
    out = torch.empty(0)
    try:
        with torch.no_grad(), autocast():  # the same precision on every rank: the all-reduces' dtypes agree
            out = shard(x)
    except Exception as exc:  # answered below, by the leader, once every rank has said how it went
        error = f"{type(exc).__name__}: {exc}"
    errors = group.allgather(error)
    if watchdog is not None:
        watchdog.mark("loading a batch", step)
    failed = next((e for e in errors if e), None)
    if failed is not None:
        raise ValueError(failed)
    return out


def receive(shard: nn.Module, group: Communicator, watchdog: Watchdog | None = None,
            autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
            ) -> Iterator[torch.Tensor | None]:  # fmt: skip
    """A follower: each batch the leader sends, run through this rank's shard; yields the whole output (None for a
    batch a rank failed on: the leader raises its error), until the leader says stop (collective over ``group``,
    with the leader's ``GroupModel``)."""
    dtype = next((p.dtype for p in shard.parameters() if p.is_floating_point()), torch.float32)
    header = torch.zeros(_HEADER, dtype=torch.int64)
    batches = 0
    while True:
        handle = group.Irecv(header, 0, tag=_TAG)
        sleep = 1e-5
        while not handle.test():  # idle: poll with growing sleeps (no spinning core), telling the watchdog
            if watchdog is not None:
                watchdog.mark("loading a batch", batches)
            time.sleep(sleep)
            sleep = min(2 * sleep, _IDLE_SLEEP_S)
        if int(header[0]) == _STOP:
            return
        ndim = int(header[1])
        x = torch.empty(tuple(int(d) for d in header[2 : 2 + ndim]), dtype=dtype)
        batches += 1
        try:
            out = _run(shard, group, x, watchdog, batches, autocast)
        except ValueError:  # the leader answers the error; the group goes on
            out = None
        yield out


def follow(
    shard: nn.Module,
    group: Communicator,
    watchdog: Watchdog | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> int:
    """A follower until the leader says stop (``receive``); return the number of batches."""
    return sum(1 for _ in receive(shard, group, watchdog, autocast))


class ServingGroup:
    """One model's tensor shards on every rank of the job, for ``caldera serve --tp N``: the leader (rank 0)
    calls ``model`` from its batching thread; the other ranks ``follow()`` until the leader calls ``stop()``."""

    def __init__(self, ref: str | Path, tp: int, world: World, device: str | None = None, trust_code: bool = False,
                 hang_timeout: float | None = None) -> None:  # fmt: skip
        if tp != world.size:
            raise ConfigError(f"serve --tp {tp}: the model's shards need exactly {tp} ranks, this job has "
                              f"{world.size}; start it with mpiexec -n {tp} (or caldera launch -n {tp})")  # fmt: skip
        files = RunDir(resolve_run(ref))
        missing = files.missing()
        if missing:
            raise ConfigError(f"{ref} has no {' or '.join(missing)}: give the run directory of a finished "
                              "`caldera train` run, or NAME@VERSION")  # fmt: skip
        # Only the model is built here, so only its import path needs trust (a custom data source stays unread).
        cfg = Config.model_validate(files.read_config(trust_code=trust_code, keys=("model.name",)))
        self.world, self.group = world, world.comm
        shard, shapes, self.strategy = load_shard(files.path, cfg, self.group, device or world.device)
        timeout = hang_timeout_for(world, hang_timeout)
        self.watchdog = Watchdog(world, timeout).start() if timeout > 0 else None
        self.leading = world.rank == 0
        self.shard = shard
        self.model = GroupModel(shard, shapes, self.group, self.watchdog)

    def follow(self) -> int:
        """A follower: serve the leader's batches until it stops; return how many."""
        try:
            return follow(self.shard, self.group, self.watchdog)
        finally:
            self.close()

    def stop(self) -> None:
        """The leader, after its last batch: release the followers."""
        self.model.stop()
        self.close()

    def close(self) -> None:
        """Stop the watchdog and restore the shard's layers."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        self.strategy.close()
