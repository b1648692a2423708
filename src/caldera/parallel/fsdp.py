"""Parameters sharded over data-parallel ranks (ZeRO stage 3): no rank holds the whole model, at any time.

The flat parameter vector (the layout of ZeRO-1/2 in ``parallel/zero.py``) is cut into N equal ranges; each rank
keeps only its range (``local``), which its optimizer steps. The model is cut into *units*: each element of a
top-level ``nn.ModuleList`` or ``nn.Sequential`` (a transformer's blocks, an MLP's layers) is one, and the
parameters outside them (embeddings, the head) form the root unit. A unit's parameters are contiguous in the flat
vector, so they are views of one buffer (``Unit.full``) whose storage exists only while the unit is gathered:

- forward: just before a unit runs, its buffer is all-gathered (``Iallgatherv``: the ranges cut units unevenly),
  and the next unit's gather is started at once, so that it travels while this one computes (prefetch); after the
  unit ran, its storage is freed (``untyped_storage().resize_(0)``: the autograd graph keeps its views, which see
  the numbers again once the storage is gathered anew). The last unit stays for backward; the root unit stays
  until its gradients are in (it runs first and last).
- backward: a hook on a unit's output fires when the gradient reaches it, before the unit's own backward: the unit
  is gathered again (waiting for its prefetch) and the gather of the unit before it is started. Once every
  parameter of a unit has its gradient, its storage is freed; the gradients are reduce-scattered per unit by
  ZeRO-2's machinery in ``parallel/allreduce.py`` (one bucket per unit) into this rank's range.
- step: the optimizer updates ``local``; every unit is freed, so the next forward gathers the new numbers.

The model can arrive built on the meta device (``builds_on_meta``): each module is materialised, broadcast from
rank 0, cut to this rank's range and freed before the next (``caldera.models.materialize``), so the whole model
never exists in one process. Checkpoints hold each rank's ranges of the parameters beside its optimizer ranges
(layout kind ``zero-3``). The final weights are written the same way (``write_weights``), into ``<run dir>/model-shards/``:
each rank its range, nothing gathered and no ``model.pt``; ``ZeroWeights`` reads them back memory-mapped, one tensor
at a time (whole, for one process, or a tensor-parallel slice of each, for ``predict``/``serve --tp``).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caldera.comm.base import Handle, wait_yielding
from caldera.comm.buckets import Bucket, padded
from caldera.errors import ConfigError
from caldera.io import atomic_write, atomic_write_text, replace_directory
from caldera.models.materialize import materialize, on_meta
from caldera.names import WEIGHT_LAYOUT, WEIGHT_SHARED
from caldera.world import World

KIND = "zero-3"  # the layout kind of shard-wise weights (and of checkpoints' shards) written by ZeRO-3


@dataclass
class Unit:
    """A group of parameters gathered and freed together: ``[start, end)`` of the flat vector."""

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # (state_dict name, parameter), in the flat layout's order
    offsets: list[int]  # each parameter's offset in the flat vector
    start: int = 0
    end: int = 0
    full: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    counts: list[int] = field(default_factory=list)  # numbers each rank contributes to the gather
    handle: Handle | None = None
    gathered: bool = False
    pending: int = 0  # parameters whose gradient has not arrived in this backward


def units_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The wrap policy: each element of a top-level ``nn.ModuleList`` or ``nn.Sequential`` (or of the model, if it
    is one) that holds parameters, in registration order, which is assumed to be the order they run in."""
    tops = [("", model)] if isinstance(model, (nn.ModuleList, nn.Sequential)) else []
    tops += [(n, m) for n, m in model.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    found = []
    for prefix, top in tops:
        for key, child in top.named_children():
            if any(True for _ in child.parameters()):
                found.append((f"{prefix}.{key}" if prefix else key, child))
    return found


class ParamShards:
    """This rank's range of a model's flat parameters and the hooks that gather each unit around its use.

    ``comm`` gathers (``Iallgatherv``) and broadcasts; ``rank``/``size`` cut the ranges as ``ShardedOptimizer``
    does. ``setup`` materialises a meta model (or cuts a whole one) and re-points ``optimizer`` at the parameters.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
        self.model, self.world, self.comm = model, world, world.comm
        self.rank, self.size = world.rank, world.size
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError("shard_params keeps fp32 parameters (bf16-mixed autocasts them): use [precision] "
                             "mode = 'fp32' or 'bf16-mixed'")  # fmt: skip
        names = {id(p): n for n, p in model.named_parameters()}
        blocks = units_of(model)
        in_block = {id(p) for _, m in blocks for p in m.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_block]
        groups = [("", model, root)] + [(n, m, list(m.parameters())) for n, m in reversed(blocks)]
        # The flat layout: the root unit first, then the blocks last to first (their gradients' order), each
        # unit's parameters reversed; every parameter starts on a 64-byte boundary, as in the gradient buckets.
        self.units: list[Unit] = []
        offset = 0
        for name, module, params in groups:
            params = [p for p in reversed(params) if p.requires_grad]
            if not params:
                continue
            unit = Unit(name, module, [(names[id(p)], p) for p in params], [], start=offset)
            for p in params:
                unit.offsets.append(offset)
                offset += padded(p.numel(), 4)
            unit.end = offset
            self.units.append(unit)
        last = self.units[-1] if self.units else None
        self.total = max(
            (o + p.numel() for u in self.units for (_, p), o in zip(u.params, u.offsets)), default=0
        )
        if last is not None:
            last.end = self.total  # as ShardedOptimizer counts: the flat vector ends with the last number
        self.chunk = -(-self.total // self.size)
        self.lo, self.hi = (
            min(self.rank * self.chunk, self.total),
            min((self.rank + 1) * self.chunk, self.total),
        )
        ranges = [
            (min(r * self.chunk, self.total), min((r + 1) * self.chunk, self.total)) for r in range(self.size)
        ]
        for u in self.units:
            u.counts = [max(0, min(hi, u.end) - max(lo, u.start)) for lo, hi in ranges]
            u.full = torch.empty(u.end - u.start)
            u.full.untyped_storage().resize_(0)
        self.local = torch.zeros(self.hi - self.lo)
        self._where = {n: (u, o) for u in self.units for (n, _), o in zip(u.params, u.offsets)}
        self._blocks = [u for u in self.units if u.name]
        self._blocks.reverse()  # forward order
        self._root = next((u for u in self.units if not u.name), None)
        self.whole = False  # gather_whole ran: every unit stays gathered, the hooks do nothing
        self.in_backward = False
        self._hooks: list[Any] = []
        self._setup(model, optimizer)

    # -- materialising -------------------------------------------------------------------------------------------
    def _setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if on_meta(model):
            materialize(model, self._keep, "cpu", optimizer)
        else:
            for name, module in list(model.named_modules()):
                self._keep(name, module)
        with torch.no_grad():
            for b in model.buffers():  # replicated: rank 0's
                self.comm.Bcast(b.data if b.is_contiguous() else b.data.contiguous(), root=0)
        # Parameters are new objects after materialising: take them from the model again.
        by_name = dict(model.named_parameters())
        for u in self.units:
            u.params = [(n, by_name[n]) for n, _ in u.params]

    @torch.no_grad()
    def _keep(self, name: str, module: nn.Module) -> None:
        """Broadcast ``module``'s own parameters from rank 0, keep this rank's range of them, free the rest."""
        for key, p in list(module.named_parameters(recurse=False)):
            full_name = f"{name}.{key}" if name else key
            if full_name not in self._where:  # frozen: replicated, as it is
                self.comm.Bcast(p.data if p.is_contiguous() else p.data.contiguous(), root=0)
                continue
            unit, o = self._where[full_name]
            data = p.data.contiguous()
            self.comm.Bcast(data, root=0)
            a, b = max(self.lo, o), min(self.hi, o + p.numel())
            if a < b:
                self.local[a - self.lo : b - self.lo] = data.view(-1)[a - o : b - o]
            # A view needs the storage in place to be made (bounds are checked); it exists for that moment only.
            storage = unit.full.untyped_storage()
            storage.resize_(unit.full.numel() * unit.full.element_size())
            p.data = unit.full[o - unit.start : o - unit.start + p.numel()].view(p.shape)
            storage.resize_(0)

    def layout(self) -> list[tuple[nn.Parameter, int]]:
        """Every sharded parameter with its flat offset (``ShardedOptimizer``'s layout)."""
        return [(p, o) for u in self.units for (_, p), o in zip(u.params, u.offsets)]

    def names(self) -> dict[int, str]:
        """{id(parameter): its state_dict name}."""
        return {id(p): n for u in self.units for n, p in u.params}

    def buckets(self) -> list[Bucket]:
        """One gradient bucket per unit, without storage (ZeRO-2 gives it storage while its gradients arrive)."""
        return [Bucket(params=[p for _, p in u.params], flat=torch.empty(0), pending=len(u.params), index=i,
                       offsets=[o - u.start for o in u.offsets], start=u.start)
                for i, u in enumerate(self.units)]  # fmt: skip

    # -- gathering and freeing -----------------------------------------------------------------------------------
    def gather(self, unit: Unit | None) -> None:
        """Start gathering ``unit`` (nothing if it is gathered or on its way)."""
        if unit is None or unit.gathered or unit.handle is not None:
            return
        unit.full.untyped_storage().resize_(unit.full.numel() * unit.full.element_size())
        a, b = max(self.lo, unit.start), min(self.hi, unit.end)
        mine = self.local[a - self.lo : max(a, b) - self.lo]
        unit.handle = self.comm.Iallgatherv(mine, unit.full, unit.counts)
        unit.pending = len(unit.params)

    def progress(self) -> None:
        """Test every gather in flight, completing those that arrived. MPI moves a non-blocking collective only
        inside MPI calls (no progress thread): a large prefetched gather (several rendezvous messages) would sit
        still while the unit before it computes, and the whole transfer would be paid at its ``ready``."""
        for u in self.units:
            if u.handle is not None and u.handle.test():
                u.handle = None
                u.gathered = True

    def ready(self, unit: Unit) -> None:
        """Make sure ``unit`` is gathered (start it if needed, wait for it)."""
        self.gather(unit)
        if unit.handle is not None:
            # Polling with yields, not MPI's spinning wait: on shared cores the spin takes time from the very
            # rank whose range is late (see comm.base.wait_yielding).
            wait_yielding(unit.handle)
            unit.handle = None
            unit.gathered = True

    def free(self, unit: Unit) -> None:
        """Give ``unit``'s storage back (waiting first for a gather still in flight)."""
        if self.whole:
            return
        if unit.handle is not None:
            wait_yielding(unit.handle)
            unit.handle = None
        unit.full.untyped_storage().resize_(0)
        unit.gathered = False

    def free_all(self) -> None:
        """After the optimizer step: every unit is stale; the next forward gathers the updated numbers."""
        for u in self.units:
            self.free(u)

    def gather_whole(self) -> None:
        """Gather every unit and keep them (collective): the model is whole on every rank from here on (the end of
        a run: ``model.pt``, plots)."""
        for u in self.units:
            self.ready(u)
        self.whole = True

    def join_forward(self) -> None:
        """Take part in the gathers of one forward another rank runs while this one has no batch (validation)."""
        for u in ([self._root] if self._root else []) + self._blocks:
            self.ready(u)
            self.free(u)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Gather each unit around its forward and backward; free it after (see the module docstring)."""
        model = self.model
        self._hooks.append(model.register_forward_pre_hook(self._root_pre_forward))
        self._hooks.append(model.register_forward_hook(self._root_post_forward))
        for i, u in enumerate(self._blocks):
            nxt = self._blocks[i + 1] if i + 1 < len(self._blocks) else None
            prev = self._blocks[i - 1] if i > 0 else None
            last = nxt is None
            self._hooks.append(u.module.register_forward_pre_hook(self._pre_forward(u, nxt)))
            self._hooks.append(u.module.register_forward_hook(self._post_forward(u, prev, last)))
        # Between the layers inside each unit, MPI gets a call that moves the prefetched gathers (``progress``).
        for u in self._blocks:
            for sub in list(u.module.modules())[1:]:
                self._hooks.append(sub.register_forward_pre_hook(lambda *a: self._progress_hook()))
        for u in self.units:
            for _, p in u.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_arrived(u)))
        # (torch marks the hook function itself: a bound method cannot take the mark, a lambda can)
        self._hooks.append(model.register_state_dict_post_hook(lambda *a: self._shapes_only(*a)))
        self._hooks.append(model.register_load_state_dict_pre_hook(self._before_load))
        self._hooks.append(model.register_load_state_dict_post_hook(self._after_load))

    def _progress_hook(self) -> None:
        if not self.whole:
            self.progress()

    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if self.whole:
            return
        if self._root is not None:
            self.gather(self._root)
        if self._blocks:
            self.gather(self._blocks[0])  # prefetch: travels while the root's first layers run
        if self._root is not None:
            self.ready(self._root)

    def _root_post_forward(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._root is not None and not torch.is_grad_enabled() and not self.in_backward:
            self.free(self._root)  # no backward follows (validation)

    def _pre_forward(self, unit: Unit, nxt: Unit | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self.whole:
                return
            self.gather(unit)
            self.gather(nxt)  # prefetch the next unit before this one computes
            self.ready(unit)

        return hook

    def _post_forward(self, unit: Unit, prev: Unit | None, last: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self.whole or self.in_backward:  # (a recomputation inside backward keeps it for its backward)
                return
            training = torch.is_grad_enabled()
            if not (training and last):
                self.free(unit)
            if training:
                for t in _tensors(out):
                    if t.requires_grad:
                        t.register_hook(self._pre_backward(unit, prev))

        return hook

    def _pre_backward(self, unit: Unit, prev: Unit | None) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self.whole:
                return
            self.gather(unit)
            self.gather(prev)  # prefetch the unit whose backward comes next
            self.ready(unit)

        return hook

    def _grad_arrived(self, unit: Unit) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            self.progress()  # backward: each gradient that arrives lets MPI move the prefetched gather
            unit.pending -= 1
            if unit.pending == 0:
                self.free(unit)  # its gradients are all in: its parameters are not needed in this backward

        return hook

    # -- state_dict ----------------------------------------------------------------------------------------------
    def _shapes_only(self, module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
        """A sharded parameter has no numbers in this process: the model's state_dict holds its shape only (a
        checkpoint takes the ranges from the shards), unless the model was gathered whole."""
        if self.whole:
            return
        for u in self.units:
            for n, p in u.params:
                state[prefix + n] = torch.empty(p.shape, dtype=p.dtype, device="meta")

    def _before_load(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        if not self.whole:  # the parameters need storage to be copied into; cut again after
            for u in self.units:
                u.full.untyped_storage().resize_(u.full.numel() * u.full.element_size())

    @torch.no_grad()
    def _after_load(self, module: nn.Module, incompatible: Any) -> None:
        if self.whole:
            return
        for u in self.units:
            a, b = max(self.lo, u.start), min(self.hi, u.end)
            if a < b:
                self.local[a - self.lo : b - self.lo] = u.full[a - u.start : b - u.start]
            self.free(u)

    # -- final weights, shard-wise ------------------------------------------------------------------------------------
    def write_weights(self, directory: Path) -> None:
        """Write the weights into ``directory`` without gathering them (collective): each rank its range of the flat
        parameters (``zero3-NNNNN.pt``), rank 0 also the replicated tensors (buffers, frozen parameters) and the
        layout, last; the directory appears complete under its name or not at all."""
        tmp = directory.with_name(f".{directory.name}.partial")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.world.barrier()
        atomic_write(tmp / _file(self.rank), lambda f: torch.save({"range": self.local.detach()}, f))
        if self.rank == 0:
            rest = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k not in self._where}
            atomic_write(tmp / WEIGHT_SHARED, lambda f: torch.save(rest, f))
        self.world.barrier()
        if self.rank == 0:
            ranges = [[min(r * self.chunk, self.total), min((r + 1) * self.chunk, self.total)]
                      for r in range(self.size)]  # fmt: skip
            layout = {"kind": KIND, "size": self.size, "total": self.total, "ranges": ranges,
                      "files": [_file(r) for r in range(self.size)], "dtype": str(self.local.dtype).removeprefix("torch."),
                      "params": [{"name": n, "offset": o, "shape": list(p.shape)} for u in self.units
                                 for (n, p), o in zip(u.params, u.offsets)]}  # fmt: skip
            atomic_write_text(tmp / WEIGHT_LAYOUT, json.dumps(layout, indent=2))
            replace_directory(tmp, directory)
        self.world.barrier()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _tensors(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _file(rank: int) -> str:
    return f"zero3-{rank:05d}.pt"


def load_mapped(path: Path) -> dict[str, torch.Tensor]:
    """A shard file of shard-wise weights, memory-mapped (nothing read until used; tensors only, no code runs)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


class ZeroWeights(Mapping[str, torch.Tensor]):
    """ZeRO-3's shard-wise weights (``ParamShards.write_weights``) as a read-only state_dict, memory-mapped: each
    tensor (``weights[name]``) is a view of the one rank file holding it (nothing is read until used, and a slice
    reads its own pages only), or, for a parameter the ranges cut between two files, its pieces joined (that one
    tensor in memory)."""

    def __init__(self, directory: Path, layout: dict[str, Any]) -> None:
        self.directory, self.layout = directory, layout
        try:
            self.ranges = [(int(lo), int(hi)) for lo, hi in layout["ranges"]]
            self.params = {p["name"]: (int(p["offset"]), [int(d) for d in p["shape"]])
                           for p in layout["params"]}  # fmt: skip
            self.file_names = list(layout["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{directory / WEIGHT_LAYOUT}: not a layout of ZeRO-3 weights ({exc!r} is wrong or "
                              "missing); write the weights again with `caldera train`") from None  # fmt: skip
        self.shared = self._open(WEIGHT_SHARED)
        self._files: dict[int, torch.Tensor] = {}

    def __iter__(self) -> Iterator[str]:
        """Every tensor's name: the sharded parameters, then the replicated tensors."""
        return iter([*self.params, *self.shared])

    def __len__(self) -> int:
        return len(self.params) + len(self.shared)

    def __contains__(self, name: object) -> bool:
        return name in self.params or name in self.shared

    def _open(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_mapped(self.directory / name)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            why = "missing" if isinstance(exc, FileNotFoundError) else f"not readable ({exc})"
            raise ConfigError(f"{self.directory / name}: {why}; the ZeRO-3 weights need every rank's file: copy "
                              "the whole model-shards/ directory, or train again") from None  # fmt: skip

    def _range(self, r: int) -> torch.Tensor:
        if r not in self._files:
            self._files[r] = self._open(self.file_names[r])["range"]
        return self._files[r]

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (KeyError if the weights have none)."""
        if name not in self.params:
            return self.shared[name]
        offset, shape = self.params[name]
        n = math.prod(shape)
        pieces = [self._range(r)[max(lo, offset) - lo : min(hi, offset + n) - lo]
                  for r, (lo, hi) in enumerate(self.ranges) if max(lo, offset) < min(hi, offset + n)]  # fmt: skip
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.empty(0)
        if flat.numel() != n:
            raise ConfigError(f"{self.directory}: {name!r} has {flat.numel()} numbers in the rank files, its shape "
                              f"{shape} needs {n}; write the weights again with `caldera train`")  # fmt: skip
        return flat.view(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor whole, in memory (for one process: export, fine-tuning, publishing)."""
        return {name: self[name].clone() for name in self}
