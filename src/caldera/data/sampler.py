"""Rank sharding: which samples this rank takes at each step of an epoch.

Each step takes the next ``global_batch`` indices of an epoch-wide permutation (seeded by seed and epoch, so
every rank computes the same one without talking) and gives rank r the r-th contiguous slice of it. N ranks with
``global_batch / N`` samples each therefore see exactly the samples one process would see with ``global_batch``:
averaging their gradients reproduces the single-process step. Every rank runs the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Return the sample order for ``epoch`` (identical on every rank)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def as_xy(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batch into (input, target): the last element is the target."""
    if isinstance(batch, Mapping):
        raise ValueError(f"samples are dicts ({', '.join(map(str, batch))}): a loss takes (input, target); give a "
                         "training step that takes the batch as it is ([train] step, Trainer(step=...))")  # fmt: skip
    if len(batch) < 2:
        raise ValueError("each sample must be (input, target); got a single tensor")
    return (batch[0] if len(batch) == 2 else tuple(batch[:-1])), batch[-1]  # type: ignore[return-value]


def batch_len(batch: Any) -> int:
    """The samples in a batch: the first dimension of its first tensor (a batch is a tensor, or a tuple, list or
    dict of them)."""
    if torch.is_tensor(batch):
        return len(batch)
    items = batch.values() if isinstance(batch, Mapping) else batch
    return next(len(t) for t in items if torch.is_tensor(t))


def split_batch(batch: Any, k: int) -> list[Any]:
    """Cut every tensor of a batch into ``k`` pieces along the first dimension (fewer when the batch has fewer
    samples); other values go to every piece as they are."""
    n = batch_len(batch)
    if torch.is_tensor(batch):
        return [p for p in batch.tensor_split(k) if len(p)]
    sizes = [len(c) for c in torch.arange(n).tensor_split(k) if len(c)]

    def cut(t: Any) -> list[Any]:
        return list(t.split(sizes)) if torch.is_tensor(t) else [t] * len(sizes)

    if isinstance(batch, Mapping):
        columns = {key: cut(t) for key, t in batch.items()}
        return [{key: parts[i] for key, parts in columns.items()} for i in range(len(sizes))]
    return [type(batch)(parts) for parts in zip(*(cut(t) for t in batch))]


def batch_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A collated batch on ``device``: a tuple of tensors (one tensor becomes a 1-tuple, as before), or a dict."""
    if isinstance(batch, Mapping):
        return {
            k: t.to(device, non_blocking=non_blocking) if torch.is_tensor(t) else t for k, t in batch.items()
        }
    batch = batch if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(t.to(device, non_blocking=non_blocking) for t in batch)


class ShardedBatches:
    """Yield this rank's ``(batch, n_local, n_global)`` for each step of an epoch.

    With ``evaluation=True`` nothing is dropped and a rank may get fewer steps (never an empty batch); use it
    only where no collective runs per step.
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch: int,
        rank: int = 0,
        size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        device: torch.device | None = None,
        evaluation: bool = False,
    ) -> None:
        if global_batch < size:
            raise ValueError(
                f"global batch {global_batch} is smaller than the number of ranks {size}; "
                f"set [data] batch_size to at least {size}"
            )
        self.dataset, self.global_batch = dataset, global_batch
        self.rank, self.size = rank, size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_workers = num_workers
        self.device = device or torch.device("cpu")
        self.evaluation = evaluation
        self.epoch = 0
        self.start_step = 0
        self.n = len(dataset)  # type: ignore[arg-type]
        self._resident: tuple[torch.Tensor, ...] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch whose permutation the next iteration uses, and the step to start from (resume)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        if self.evaluation:  # evaluation sees every sample once; a rank may sit out the tail
            return math.ceil(self.n / self.global_batch)
        full, tail = divmod(self.n, self.global_batch)
        # A tail smaller than the number of ranks would leave some rank without data: it is dropped.
        return full + (1 if tail >= self.size and not self.drop_last else 0)

    def plan(self) -> list[tuple[torch.Tensor, int]]:
        """Return this rank's index tensor and the step's global sample count, for each step."""
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        steps = []
        for i in range(self.start_step, len(self)):
            chunk = perm[i * self.global_batch : (i + 1) * self.global_batch]
            steps.append((torch.tensor_split(chunk, self.size)[self.rank], len(chunk)))
        return [s for s in steps if len(s[0]) > 0]

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], int, int]]:
        plan = self.plan()
        non_blocking = self.device.type == "cuda"
        if isinstance(self.dataset, TensorDataset):
            # In-memory tensors: one fancy-index per batch beats collating sample by sample.
            resident = self.resident_tensors()
            for idx, n_global in plan:
                if resident:
                    batch = tuple(t[idx.to(self.device, non_blocking=True)] for t in resident)
                else:
                    batch = tuple(
                        t[idx].to(self.device, non_blocking=non_blocking) for t in self.dataset.tensors
                    )
                yield batch, len(idx), n_global
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[idx.tolist() for idx, _ in plan],
            num_workers=self.num_workers,
            pin_memory=non_blocking,
            multiprocessing_context=_worker_context() if self.num_workers else None,
        )
        for batch, (idx, n_global) in zip(loader, plan):
            yield batch_to(batch, self.device, non_blocking), len(idx), n_global

    def resident_tensors(self) -> tuple[torch.Tensor, ...]:
        """The in-memory dataset copied to the GPU once, if it takes at most 1/8 of the free GPU memory; else ().

        Small in-memory datasets (a simulation's snapshots, most tables) then cost no host-to-device copy per step,
        which on a fast GPU is what makes a small model input-bound.
        """
        if self.device.type != "cuda" or not isinstance(self.dataset, TensorDataset):
            return ()
        if self._resident is None:
            tensors = self.dataset.tensors
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            fits = nbytes <= torch.cuda.mem_get_info(self.device)[0] // 8
            self._resident = tuple(t.to(self.device) for t in tensors) if fits else ()
        return self._resident


def _worker_context() -> str | None:
    """Forking a process that initialised MPI breaks MPI in the child: use forkserver once MPI is up."""
    import sys

    if "mpi4py.MPI" in sys.modules:
        return "forkserver"
    return None


def split_dataset(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split off a seeded random validation subset of ``val_fraction`` (None when the fraction is 0)."""
    n = len(dataset)  # type: ignore[arg-type]
    n_val = math.floor(n * val_fraction)
    if n_val == 0:
        return dataset, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    train_idx, val_idx = perm[n_val:], perm[:n_val]
    if isinstance(dataset, TensorDataset):
        return (TensorDataset(*(t[train_idx] for t in dataset.tensors)),
                TensorDataset(*(t[val_idx] for t in dataset.tensors)))  # fmt: skip
    return torch.utils.data.Subset(dataset, train_idx), torch.utils.data.Subset(dataset, val_idx)
