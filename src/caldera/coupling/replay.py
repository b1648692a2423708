"""A replay buffer between a running simulation and the trainer.

Training only on the newest simulation output biases the model toward the current regime and makes it forget the
earlier ones. The buffer keeps a bounded set of samples and training draws uniform random batches from it:
``"reservoir"`` keeps a uniform sample of *everything* streamed so far (Vitter's algorithm R), ``"fifo"`` keeps the
newest ``capacity`` samples (for a simulation whose early transient should be forgotten).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

POLICIES = ("reservoir", "fifo")


class ReplayBuffer:
    """Keep up to ``capacity`` (input, target) samples streamed in; draw uniform random training batches."""

    def __init__(self, capacity: int, policy: str = "reservoir", seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1 samples (got {capacity})")
        if policy not in POLICIES:
            raise ValueError(f"unknown replay policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.capacity, self.policy = capacity, policy
        self.device, self.dtype = torch.device(device), dtype  # floating samples are stored in this dtype
        self.seen = 0  # samples offered so far (stored or not)
        self.generator = torch.Generator().manual_seed(seed)
        self.x: torch.Tensor | None = None  # allocated at the first add, when the sample shapes are known
        self.y: torch.Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: Any, y: Any) -> int:
        """Offer a batch of samples (first dimension = samples; NumPy or torch); return how many were stored.

        A batch containing NaN or inf is refused whole, with the sample indices named: nothing of it is stored."""
        x, y = as_batch(x, "add(): x", self.dtype), as_batch(y, "add(): y", self.dtype)
        if len(x) != len(y):
            raise ValueError(f"add() got {len(x)} inputs but {len(y)} targets; give one target per input")
        for name, t in (("x", x), ("y", y)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = (~torch.isfinite(t.reshape(len(t), -1))).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(
                    f"add(): {name} of sample(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} of this batch holds NaN "
                    "or inf; nothing of the batch was stored (the buffer is unchanged). Check the simulation's "
                    "time step and stability, or leave those samples out."
                )
        if self.x is None:
            self._allocate(x, y)
        for name, t, store in (("x", x, self.x), ("y", y, self.y)):
            if t.shape[1:] != store.shape[1:]:
                raise ValueError(
                    f"add(): {name} samples have shape {tuple(t.shape[1:])} but the buffer holds "
                    f"{tuple(store.shape[1:])}; one buffer holds one sample shape (use one buffer per resolution)"
                )
        slots, rows = self._slots(len(x))
        if len(slots):
            self.x[slots] = x[rows].to(self.device, self.x.dtype)
            self.y[slots] = y[rows].to(self.device, self.y.dtype)
        return len(slots)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples uniformly at random (with replacement) from those held."""
        if len(self) == 0:
            raise ValueError("sample() from an empty replay buffer: add() samples from the simulation first")
        idx = torch.randint(len(self), (n,), generator=self.generator).to(self.device)
        return self.x[idx], self.y[idx]

    def _slots(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each of ``n`` new samples goes (slots) and which of them are kept (rows), in arrival order."""
        first = self.seen
        self.seen += n
        if self.policy == "fifo":
            # More than fit at once: only the newest survive.
            rows = torch.arange(max(0, n - self.capacity), n)
            return (first + rows) % self.capacity, rows
        # Reservoir: sample i (0-based over the whole stream) fills an empty slot, or replaces a uniformly chosen
        # slot with probability capacity / (i + 1).
        i = torch.arange(first, first + n, dtype=torch.float64)
        draw = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (i + 1)).long()
        slot = torch.where(i < self.capacity, i.long(), draw)
        rows = (slot < self.capacity).nonzero().flatten()
        slot = slot[rows]
        # Two new samples drawn into one slot: the later one wins, as if they had arrived one at a time.
        last = {int(s): k for k, s in enumerate(slot.tolist())}
        keep = torch.tensor(sorted(last.values()), dtype=torch.long)
        return slot[keep], rows[keep]

    # -- checkpoint -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The samples held, the stream count and the random state: a restored buffer continues identically."""
        n = len(self)
        return {
            "capacity": self.capacity, "policy": self.policy, "seen": self.seen,
            "x": None if self.x is None else self.x[:n].cpu(), "y": None if self.y is None else self.y[:n].cpu(),
            "generator": self.generator.get_state(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the capacity and policy must match)."""
        if (state["capacity"], state["policy"]) != (self.capacity, self.policy):
            raise ValueError(
                f"the saved replay buffer is capacity {state['capacity']}, policy {state['policy']!r}; this one is "
                f"capacity {self.capacity}, policy {self.policy!r}: create the buffer as it was saved"
            )
        self.seen = state["seen"]
        self.generator.set_state(state["generator"])
        self.x = self.y = None
        if state["x"] is not None:
            self._allocate(state["x"], state["y"])
            self.x[: len(state["x"])] = state["x"].to(self.device)
            self.y[: len(state["y"])] = state["y"].to(self.device)

    def _allocate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Room for ``capacity`` samples shaped and typed like those of ``x`` and ``y``."""
        self.x = torch.empty((self.capacity, *x.shape[1:]), dtype=x.dtype, device=self.device)
        self.y = torch.empty((self.capacity, *y.shape[1:]), dtype=y.dtype, device=self.device)


def as_batch(a: Any, what: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch from a simulation (NumPy or torch, first dimension = samples) as a tensor; floating values in
    ``dtype`` (a float64 simulation feeds a float32 model), integer labels as they are."""
    t = torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a.detach()
    if t.dim() == 0:
        raise ValueError(f"{what} is a scalar; give a batch (first dimension = samples)")
    return t.to(dtype) if t.is_floating_point() else t
