"""Optimizer state sharded over data-parallel ranks (ZeRO stage 1): each rank steps 1/N of the parameters.

In data parallel every rank holds the same reduced gradients and applies the same update to every parameter:
N copies of the optimizer's state (Adam: two more model-sized tensors) and N times the same arithmetic. Here the
flat parameter vector, laid out like the gradient buckets, is cut into N contiguous ranges; each rank's optimizer
holds views of its own range only, so its state is 1/N of the model, and steps it; the updated ranges are then
gathered so that every rank again holds the whole model. For elementwise optimizers (SGD, Adam, AdamW, ...) each
number is computed exactly as the unsharded optimizer would; optimizers that look across a whole tensor (LAMB's
trust ratio, LBFGS) are refused.

Checkpoints: by default (``[checkpoint] sharded = true``) each rank writes its own range's state into its own
file and the manifest records the layout (``shard_layout``); with ``sharded = false`` the ranges' states are first
gathered into the optimizer the trainer holds (on rank 0), a plain PyTorch optimizer's state. Either way a resume,
on any number of ranks and sharded or not, reassembles the whole state (``unshard``) and cuts it again.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

# Optimizers whose update of one number reads only that number's gradient and state (and scalars).
ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Rprop", "ASGD")


class ShardedOptimizer:
    """Step ``optimizer``'s update for this rank's range ``[lo, hi)`` of the flat parameter layout only.

    ``layout`` lists every parameter with its offset in the flat vector (the gradient buckets' layout).
    ``rank``/``size`` say which of ``size`` equal ranges is this rank's. ``local``: this rank's range of the flat
    parameters held apart from the parameters (ZeRO-3, ``parallel/fsdp.py``: the parameters themselves exist only
    while gathered); the optimizer steps views of it instead of views of the parameters.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layout: list[tuple[torch.nn.Parameter, int]],
                 rank: int, size: int, local: torch.Tensor | None = None) -> None:  # fmt: skip
        # fp16-mixed's wrapper: its loss scaler decides on the reduced (identical) gradients, so every rank skips
        # an overflowing step alike; the wrapped optimizer is the one to cut.
        self.scaler = getattr(optimizer, "scaler", None)
        optimizer = getattr(optimizer, "optimizer", optimizer) if self.scaler is not None else optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                "shard_optimizer needs a torch optimizer; bf16-true steps fp32 master copies of the weights instead: "
                "use [precision] mode = 'fp32', 'bf16-mixed' or 'fp16-mixed' with it, or shard_optimizer = false"
            )
        name = type(optimizer).__name__
        if name not in ELEMENTWISE:
            raise ValueError(
                f"shard_optimizer: {name} is not known to update each number on its own, so cutting its "
                f"parameters could change the result; use one of {', '.join(ELEMENTWISE)} or shard_optimizer = false"
            )
        self.base, self.layout = optimizer, layout
        self.rank, self.size = rank, size
        self.dtype = layout[0][0].dtype if layout else torch.float32
        self.total = max((o + p.numel() for p, o in layout), default=0)
        self.chunk = -(-self.total // size)  # equal ranges (the last padded), as an all-gather wants
        self.lo, self.hi = min(rank * self.chunk, self.total), min((rank + 1) * self.chunk, self.total)
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        # (param, its flat offset, start, stop within it, the view of that part that this rank's optimizer steps)
        self.pieces: list[tuple[torch.nn.Parameter, int, int, int, torch.Tensor]] = []
        by_group: dict[int, list[torch.Tensor]] = {}
        for p, o in layout:
            a, b = max(self.lo, o) - o, min(self.hi, o + p.numel()) - o
            if a < b:
                piece = (
                    p.detach().view(-1)[a:b] if local is None else local[o + a - self.lo : o + b - self.lo]
                )
                self.pieces.append((p, o, a, b, piece))
                by_group.setdefault(group_of[id(p)], []).append(piece)
        self.groups = sorted(by_group)  # the base optimizer's group of each of the shard optimizer's groups
        spec = [{**_hyper(optimizer.param_groups[i]), "params": by_group[i]} for i in self.groups]
        # Keyword defaults the constructor takes (AdamW's defaults also hold keys it sets itself); the groups
        # carry every hyperparameter anyway.
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        self.shard = type(optimizer)(spec, **defaults) if spec else None

    def step(self, grads: torch.Tensor | None = None) -> bool:
        """Update this rank's range from the (already reduced) gradients, or from ``grads``, this rank's range of
        them alone (ZeRO-2); False when the loss scaler skipped the step (on every rank alike: the weights did
        not change)."""
        self.base.state.clear()  # a whole state gathered for the last checkpoint has been written by now
        if self.scaler is not None and not self.scaler.update(
            [p.grad for p, _ in self.layout if p.grad is not None]
        ):
            return False
        if self.shard is None:
            return True
        for p, o, a, b, piece in self.pieces:
            piece.grad = p.grad.view(-1)[a:b] if grads is None else grads[o + a - self.lo : o + b - self.lo]
        for i, group in zip(self.groups, self.shard.param_groups):
            group.update(_hyper(self.base.param_groups[i]))  # a schedule changes the base optimizer's lr
        self.shard.step()
        return True

    def write_range(self, flat: torch.Tensor, start: int = 0) -> None:
        """Copy this rank's updated range into ``flat``, which holds the layout's numbers from ``start`` on."""
        for _, o, a, b, piece in self.pieces:
            flat[o + a - start : o + b - start].copy_(piece)

    @torch.no_grad()
    def read_segment(self, start: int, data: torch.Tensor) -> None:
        """Copy ``data``, the layout's numbers ``[start, start + len)`` of another rank's range, into the parameters."""
        end = start + data.numel()
        for p, o in self.layout:
            a, b = max(start, o), min(end, o + p.numel())
            if a < b:
                p.view(-1)[a - o : b - o].copy_(data[a - start : b - start])

    @torch.no_grad()
    def read_all(self, flat: torch.Tensor) -> None:
        """Copy the other ranks' ranges of every parameter from ``flat`` (this rank's own range is already there)."""
        for p, o in self.layout:
            dest = p.view(-1)
            for a, b in ((o, min(o + p.numel(), self.lo)), (max(o, self.hi), o + p.numel())):
                if a < b:
                    dest[a - o : b - o].copy_(flat[a:b])

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def gather_state(self, comm: Any, rank: int) -> None:
        """Assemble the whole optimizer state in the base optimizer on rank 0 (collective over ``comm``)."""
        local = self._range_state()
        keys = sorted({k for ks in comm.allgather(sorted(local[0])) for k in ks})
        scalars = next((s for s in comm.allgather(local[1]) if s), {})
        for key in keys:  # one model-sized vector at a time, on rank 0 only
            mine = local[0].get(key, torch.zeros(self.hi - self.lo, dtype=self.dtype))
            if rank != 0:
                comm.Send(_padded(mine, self.chunk), 0, tag=17)
                continue
            flat = torch.empty(self.chunk * comm.size, dtype=self.dtype)
            flat[: self.chunk] = _padded(mine, self.chunk)
            for r in range(1, comm.size):
                comm.Recv(flat[r * self.chunk : (r + 1) * self.chunk], r, tag=17)
            for p, o in self.layout:
                state = self.base.state.setdefault(p, {})
                state[key] = flat[o : o + p.numel()].view_as(p).to(p.device, copy=True)
                state.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()})

    def shard_layout(self, names: dict[int, str] | None = None) -> dict[str, Any]:
        """Where each number of the flat state lives, the same on every rank (JSON, for a checkpoint's manifest):
        ``size`` equal ranges of ``chunk`` numbers over ``total``; each parameter's index in the optimizer's
        ``state_dict``, its offset in the flat vector and its shape. ``names`` ({id(parameter): its name in the
        model's state_dict}): the parameters are sharded too (ZeRO-3, kind ``zero-3``): each entry names its
        parameter, whose ranges the shards hold beside the optimizer's."""
        index = {id(p): i for i, p in enumerate(p for g in self.base.param_groups for p in g["params"])}
        named = (lambda p: {"name": names[id(p)]}) if names is not None else (lambda p: {})
        return {
            "kind": "zero-1" if names is None else "zero-3",
            "size": self.size,
            "total": self.total,
            "chunk": self.chunk,
            "ranges": [[min(r * self.chunk, self.total), min((r + 1) * self.chunk, self.total)]
                       for r in range(self.size)],
            "dtype": str(self.dtype).removeprefix("torch."),
            "params": [{"index": index[id(p)], "offset": o, "shape": list(p.shape), **named(p)}
                       for p, o in self.layout],
        }  # fmt: skip

    def local_state(self) -> dict[str, Any]:
        """This rank's range of the state: ``vectors`` {key: pieces, one per parameter cut, that joined are the
        range's numbers} and ``scalars`` (a step count). The pieces are the live state, not copies: a background
        write snapshots them once (joining them first would copy the range twice)."""
        states = [self.shard.state.get(piece, {}) if self.shard else {} for *_, piece in self.pieces]
        keys, scalars = set(), {}
        for state, (*_, piece) in zip(states, self.pieces):
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == piece.shape:
                    keys.add(key)
                else:
                    scalars[key] = value.detach().cpu() if torch.is_tensor(value) else value
        vectors = {key: [state[key].detach().cpu() if key in state else torch.zeros(b - a, dtype=self.dtype)
                         for state, (_, _, a, b, _) in zip(states, self.pieces)]
                   for key in sorted(keys)}  # fmt: skip
        return {"shard": self.rank, "vectors": vectors, "scalars": scalars}

    def _range_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's range of each per-number state as one vector; the scalar states (a step count)."""
        vectors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for _, o, a, b, piece in self.pieces:
            for key, value in (self.shard.state.get(piece, {}) if self.shard else {}).items():
                if torch.is_tensor(value) and value.shape == piece.shape:
                    if key not in vectors:
                        vectors[key] = torch.zeros(self.hi - self.lo, dtype=self.dtype)
                    vectors[key][o + a - self.lo : o + b - self.lo] = value.detach().cpu()
                else:
                    scalars[key] = value.detach().cpu() if torch.is_tensor(value) else value
        return vectors, scalars

    def load_from_base(self) -> None:
        """Cut the whole state the base optimizer was loaded with into this rank's range, then drop it."""
        if self.shard is not None:
            for p, _, a, b, piece in self.pieces:
                whole = self.base.state.get(p)
                if not whole:
                    continue
                self.shard.state[piece] = {
                    k: (v.detach().reshape(-1)[a:b].clone() if torch.is_tensor(v) and v.shape == p.shape
                        else (v.clone() if torch.is_tensor(v) else v))
                    for k, v in whole.items()
                }  # fmt: skip
        self.base.state.clear()

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        if self.shard is None:
            return 0
        return sum(v.numel() * v.element_size() for s in self.shard.state.values() for v in s.values()
                   if torch.is_tensor(v))  # fmt: skip


def unshard(layout: dict[str, Any], parts: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The whole optimizer state ({parameter index: {key: tensor}}, as in a ``state_dict``) from every range's
    ``local_state()`` and their ``shard_layout()``: what ``gather_state`` would have assembled."""
    if layout.get("kind") not in ("zero-1", "zero-3"):  # the same flat ranges (zero-3 adds the parameters')
        raise ValueError(
            f"sharded optimizer state of kind {layout.get('kind')!r}: only 'zero-1' and 'zero-3' are read"
        )
    if sorted(part["shard"] for part in parts) != list(range(layout["size"])):
        raise ValueError(f"the optimizer state has {layout['size']} shards, {len(parts)} were found")
    parts = sorted(parts, key=lambda part: part["shard"])
    keys = sorted({k for part in parts for k in part["vectors"]})
    scalars = next((part["scalars"] for part in parts if part["scalars"]), {})
    state: dict[int, dict[str, Any]] = {}
    dtype = getattr(torch, layout["dtype"])
    for key in keys:  # one model-sized state at a time
        whole = {p["index"]: torch.zeros(math.prod(p["shape"]), dtype=dtype) for p in layout["params"]}
        for (lo, hi), part in zip(layout["ranges"], parts):
            if key not in part["vectors"]:  # as gather_state: a range without this state holds zeros
                continue
            # The range's pieces, in the layout's order: one per parameter it covers (alignment gaps hold none).
            pieces = iter(part["vectors"][key])
            wrong = f"optimizer state {key!r}: shard {part['shard']} does not match the layout"
            for p in layout["params"]:
                o, n = p["offset"], math.prod(p["shape"])
                a, b = max(lo, o) - o, min(hi, o + n) - o
                if a < b:
                    piece = next(pieces, None)
                    if piece is None or piece.numel() != b - a:
                        raise ValueError(wrong)
                    whole[p["index"]][a:b] = piece.reshape(-1)
            if next(pieces, None) is not None:
                raise ValueError(wrong)
        for p in layout["params"]:
            state.setdefault(p["index"], {})[key] = whole[p["index"]].view(p["shape"])
    for p in layout["params"] if keys else ():  # as gather_state: the scalars go with the vectors
        entry = state.setdefault(p["index"], {})
        entry.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()})
    return state


def merge_shards(optimizer_state: dict[str, Any], layout: dict[str, Any], parts: list[dict[str, Any]],
                 model_state: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Put the whole state ``unshard`` reassembles into ``optimizer_state`` (a ``state_dict`` whose state each
    rank wrote as shards: a torch optimizer's, or a wrapper's holding one under ``optimizer``); a ``zero-3`` layout's
    parameters go into ``model_state`` (the model's ``state_dict``, which holds shapes only for them)."""
    if layout.get("kind") == "zero-3" and model_state is not None:
        whole = unshard(layout, [{"shard": p["shard"], "vectors": {"param": p["params"]}, "scalars": {}}
                                 for p in parts])  # fmt: skip
        for p in layout["params"]:
            model_state[p["name"]] = whole[p["index"]]["param"]
    while "state" not in optimizer_state:  # fp16-mixed's wrapper: {"optimizer": ..., "scaler": ...}
        optimizer_state = optimizer_state["optimizer"]
    optimizer_state["state"].update(unshard(layout, parts))


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _padded(v: torch.Tensor, n: int) -> torch.Tensor:
    return v if v.numel() == n else torch.cat([v, v.new_zeros(n - v.numel())])
