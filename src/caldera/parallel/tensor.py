"""Tensor parallelism (Megatron-style): the Linear layers a plan names are cut over a tensor-parallel group of ranks;
the rest of the ranks (world / tp) are data-parallel replicas of that group (2-D: tp x dp).

The model file stays single-device: a plan, ``{module name pattern: "colwise" | "rowwise"}`` (like torchtitan's
``parallelize_module`` plans), names the layers from outside. A ``colwise`` layer keeps rows ``r`` of its weight
(output features, and its bias): its output is this rank's slice of the features. A ``rowwise`` layer keeps the
matching columns (input features): it takes that slice and its partial products are all-reduced, then the whole
bias is added. Between them every rank sees the same tensors, so a transformer block is split with one all-reduce
forward (after ``attn.out``, after ``mlp.down``) and one backward (the gradient of the shared input of
``q``/``k``/``v``, of ``mlp.up``) per sub-block. Attention heads split with ``q``/``k``/``v``: the model reshapes to
``(-1, head_dim)`` heads, so each rank runs its own heads.

Lifecycle: a run builds the model on the meta device (``builds_on_meta``); ``setup`` materialises it one module at
a time, each from rank 0's values, and keeps only this rank's slice of each split layer, so the whole model never
exists on a rank. A whole model (built in Python) is cut at the first training step instead. Validation runs on the
slices. Shard-wise checkpoints (``sharded_state``) and final weights (``write_sharded_weights``: ``model-shards/``)
hold each rank's slices, nothing gathered; a resume joins them (``merge_tensor_shards``) and cuts them for the new
shape (``local_state``). A plain checkpoint or ``model.pt`` (``[checkpoint] sharded = false``) gathers the slices
first (collective); the next step cuts them again. Gradients of the split weights are complete per slice; those of
every other parameter are the same on every rank of a group; replicas average all of them in ``step``.
Inference (``caldera.parallel_infer``) uses the same layers: ``materialize_shard`` then ``shard``.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from caldera.comm.base import Communicator, wait_yielding
from caldera.config import StrategyOptions
from caldera.errors import ConfigError
from caldera.io import atomic_write, atomic_write_text, replace_directory
from caldera.models.materialize import materialize, on_meta
from caldera.names import NOT_COMPILED, WEIGHT_LAYOUT, WEIGHT_SHARED
from caldera.parallel import fsdp
from caldera.parallel.base import Purpose, Strategy, register
from caldera.world import World

Kind = Literal["colwise", "rowwise"]

# The built-in ``transformer`` model's blocks (caldera/models/transformer.py), and any model that names its
# attention projections q/k/v/out and its MLP up/down the same way.
DEFAULT_PLAN: dict[str, Kind] = {
    "*attn.q": "colwise", "*attn.k": "colwise", "*attn.v": "colwise", "*attn.out": "rowwise",
    "*mlp.up": "colwise", "*mlp.down": "rowwise",
}  # fmt: skip
_HEADS = ("heads", "n_heads", "num_heads")  # attribute names under which a layer's parent counts its heads


class TensorOptions(StrategyOptions):
    """``[parallel]`` keys of strategy ``tensor``."""

    tp: int | None = Field(
        None,
        ge=1,
        description="ranks per tensor-parallel group (none: all); ranks / tp replicas train data parallel",
    )
    plan: dict[str, Kind] | None = Field(
        None, description="module name pattern -> 'colwise' | 'rowwise' (default: attention q/k/v/out and MLP "
        "up/down of the built-in transformer)",
    )  # fmt: skip


def _allreduce(comm: Communicator, t: torch.Tensor) -> None:
    """Sum ``t`` over ``comm`` in place, giving the core away while waiting instead of spinning on it.

    Every split layer is a synchronisation point (8 a step for 2 blocks): a blocking MPI all-reduce spins while the
    slowest rank of the group is still computing, which on shared cores takes time from that very rank (or from
    data workers, a simulation). Polling with a yield between tests measured 1.5-1.8x the samples/s of the
    blocking call on 2 busy cores (benchmarks/bench_tensor.py's model); ``wait_yielding`` adds short sleeps after
    64 yields, the pipeline's policy too."""
    wait_yielding(comm.Iallreduce(t))


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input every colwise slice reads)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strategy: TensorParallel) -> torch.Tensor:
        ctx.strategy = strategy
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        ctx.strategy.sum_over_group(grad)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward (the rowwise slices' partial products); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strategy: TensorParallel) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        strategy.sum_over_group(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def plan_layers(model: nn.Module, plan: dict[str, str] | None, tp: int) -> list[tuple[str, nn.Linear, str]]:
    """The (name, layer, kind) that ``plan`` (default ``DEFAULT_PLAN``) cuts in ``model`` over ``tp`` ranks; a plan
    that names no layer, a non-Linear, or a size that ``tp`` does not divide is a ConfigError naming it."""
    given = plan is not None
    patterns = dict(plan) if given else dict(DEFAULT_PLAN)
    named = [(n, m) for n, m in model.named_modules() if n]
    found: list[tuple[str, nn.Linear, str]] = []
    for pattern, kind in patterns.items():
        if kind not in ("colwise", "rowwise"):
            raise ConfigError(f"[parallel] plan: {pattern!r} = {kind!r}; use 'colwise' or 'rowwise'")
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if given and not hits:
            raise ConfigError(f"[parallel] plan: {pattern!r} names no module of {type(model).__name__} "
                              f"(its Linear layers: {_linears(model)})")  # fmt: skip
        found += [(n, m, kind) for n, m in hits]
    if not found:
        raise ConfigError(f"[parallel] strategy = 'tensor': the default plan (attention q/k/v/out, MLP up/down) names "
                          f"no module of {type(model).__name__}; give [parallel] plan = {{'name pattern' = 'colwise' "
                          f"| 'rowwise'}} over its Linear layers ({_linears(model)})")  # fmt: skip
    seen: dict[str, str] = {}
    for name, layer, kind in found:
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"[parallel] plan: {name!r} is a {type(layer).__name__}, not an nn.Linear (colwise and "
                              "rowwise cut Linear layers); name its Linear layers")  # fmt: skip
        if seen.setdefault(name, kind) != kind:
            raise ConfigError(f"[parallel] plan: {name!r} is named both colwise and rowwise; name it once")
        size, what = (layer.out_features, "output") if kind == "colwise" else (layer.in_features, "input")
        if size % tp:
            raise ConfigError(f"[parallel] plan: {name!r} ({kind}) has {size} {what} features, which tp = {tp} does "
                              "not divide; choose a tp that divides it, or leave the layer out of the plan")  # fmt: skip
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        heads = next((getattr(parent, a) for a in _HEADS if isinstance(getattr(parent, a, None), int)), None)
        if heads is not None and heads % tp:
            raise ConfigError(f"[parallel] plan: {parent_name!r} has {heads} attention heads, which tp = {tp} does "
                              "not divide; choose a tp that divides the heads")  # fmt: skip
    unique = {name: (name, layer, kind) for name, layer, kind in found}
    return list(unique.values())


def split_params(layers: list[tuple[str, nn.Linear, str]]) -> dict[str, int]:
    """{parameter name: the dimension it is cut along} for the plan's ``layers`` (``plan_layers``): a colwise
    layer's weight and bias by rows (0), a rowwise layer's weight by columns (1); its bias stays whole."""
    out: dict[str, int] = {}
    for name, layer, kind in layers:
        out[f"{name}.weight"] = 0 if kind == "colwise" else 1
        if kind == "colwise" and layer.bias is not None:
            out[f"{name}.bias"] = 0
    return out


@torch.no_grad()
def materialize_shard(model: nn.Module, split: dict[str, int], rank: int, tp: int,
                      read: Callable[[str, int | None], torch.Tensor], device: torch.device | str = "cpu") -> None:  # fmt: skip
    """Give ``model`` (built on the meta device: it holds no memory) its tensors one at a time from ``read(name,
    dim)``: this rank's slice (``rank`` of ``tp``, cut along ``dim``) of each parameter in ``split``, every other
    tensor whole (``dim`` None). ``read`` may return a memory-mapped tensor: only what it returns is copied, so
    the whole model never exists on this rank (see ``state_reader`` and ``shards_reader``)."""
    for prefix, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for key, old in list(getattr(module, kind).items()):
                if old is None:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                dim = split.get(name)
                piece = read(name, dim)
                want = old.shape if dim is None else old.chunk(tp, dim)[rank].shape
                if piece.shape != want:
                    raise ConfigError(f"the weights' {name!r} gives shape {tuple(piece.shape)} to rank {rank} of "
                                      f"{tp}, the model needs {tuple(want)}; the [model] args must match the run "
                                      "that wrote them")  # fmt: skip
                value = piece.to(device, old.dtype, copy=True).contiguous()
                getattr(module, kind)[key] = nn.Parameter(value, old.requires_grad) if kind == "_parameters" \
                    else value  # fmt: skip


def state_reader(state: Mapping[str, torch.Tensor], rank: int, tp: int,
                 where: str) -> Callable[[str, int | None], torch.Tensor]:  # fmt: skip
    """``materialize_shard``'s ``read`` over a whole state_dict (memory-mapped: slicing copies nothing)."""

    def read(name: str, dim: int | None) -> torch.Tensor:
        if name not in state:
            raise ConfigError(f"{where} has no {name!r}: the [model] name and args must match the run that wrote "
                              "it (a buffer the model makes itself cannot be built on the meta device)")  # fmt: skip
        t = state[name]
        return t if dim is None else t.chunk(tp, dim)[rank]

    return read


# -- shard-wise weights: <run dir>/model-shards/ ----------------------------------------------------------------------
# layout.json (kind "tensor", size, params: name, dim, shape), shared.pt (every tensor no layer cuts, whole) and
# tp-NNNNN.pt (rank NNNNN's slices of the split parameters); written by the ranks of the first replica, each its own.
# ZeRO-3 writes kind "zero-3" into the same directory (caldera.parallel.fsdp): the readers below take both.
LAYOUT, SHARED = WEIGHT_LAYOUT, WEIGHT_SHARED


def _shard_file(r: int) -> str:
    return f"tp-{r:05d}.pt"


def read_layout(directory: Path) -> dict[str, Any]:
    """The layout of shard-wise weights (ConfigError naming the file when it is not one)."""
    try:
        layout = json.loads((directory / LAYOUT).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory / LAYOUT}: not readable ({exc}); give the run directory of a finished "
                          "run") from None  # fmt: skip
    if not isinstance(layout, dict) or layout.get("kind") not in ("tensor", fsdp.KIND):
        raise ConfigError(f"{directory / LAYOUT}: not a layout of tensor-parallel or ZeRO-3 weights")
    return layout


def shards_reader(directory: Path, rank: int, tp: int) -> Callable[[str, int | None], torch.Tensor]:
    """``materialize_shard``'s ``read`` over shard-wise weights, memory-mapped: for the tp they were written
    with, a rank reads its own file only; for another tp, each split tensor is joined from the files (one tensor
    at a time) and cut anew. ZeRO-3's weights: each slice is read from the rank files' ranges that hold it."""
    layout = read_layout(directory)
    if layout["kind"] == fsdp.KIND:
        return state_reader(fsdp.ZeroWeights(directory, layout), rank, tp, str(directory))
    size, cut = layout["size"], {p["name"]: p["dim"] for p in layout["params"]}
    shared = fsdp.load_mapped(directory / SHARED)
    files: dict[int, dict[str, torch.Tensor]] = {}

    def part(r: int) -> dict[str, torch.Tensor]:
        if r not in files:
            files[r] = fsdp.load_mapped(directory / _shard_file(r))
        return files[r]

    def read(name: str, dim: int | None) -> torch.Tensor:
        if name not in cut:
            return state_reader(shared, rank, tp, str(directory / SHARED))(name, dim)
        if size == tp and cut[name] == dim:
            return part(rank)[name]
        whole = torch.cat([part(r)[name] for r in range(size)], cut[name])
        return whole if dim is None else whole.chunk(tp, dim)[rank]

    return read


def open_sharded_weights(directory: Path) -> Mapping[str, torch.Tensor]:
    """Shard-wise weights as a state_dict to load from: ZeRO-3's memory-mapped (each tensor read as it is copied
    into the model), tensor parallel's joined (``read_sharded_weights``)."""
    layout = read_layout(directory)
    if layout["kind"] == fsdp.KIND:
        return fsdp.ZeroWeights(directory, layout)
    return read_sharded_weights(directory)


def read_sharded_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The whole state_dict from shard-wise weights (for one process: export, fine-tuning, a plain loader)."""
    layout = read_layout(directory)
    if layout["kind"] == fsdp.KIND:
        return fsdp.ZeroWeights(directory, layout).state_dict()
    state = dict(fsdp.load_mapped(directory / SHARED))
    parts = [fsdp.load_mapped(directory / _shard_file(r)) for r in range(layout["size"])]
    for p in layout["params"]:
        state[p["name"]] = torch.cat([part[p["name"]] for part in parts], p["dim"]).clone()
    return state


def merge_tensor_shards(shared: dict[str, Any], layout: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """Make a shard-wise checkpoint's state whole: each split parameter and its optimizer state joined from the
    ranks' slices (``TensorParallel.sharded_state``) into ``shared["model"]`` and ``shared["optimizer"]``."""
    if sorted(part["shard"] for part in parts) != list(range(layout["size"])):
        raise ValueError(f"the checkpoint has {layout['size']} tensor shards, {len(parts)} were found")
    parts = sorted(parts, key=lambda part: part["shard"])
    optimizer = shared["optimizer"]
    while "state" not in optimizer:  # fp16-mixed's wrapper: {"optimizer": ..., "scaler": ...}
        optimizer = optimizer["optimizer"]
    for p in layout["params"]:
        name, dim, index = p["name"], p["dim"], p["index"]
        shared["model"][name] = torch.cat([part["model"][name] for part in parts], dim)
        keys = parts[0]["optimizer"].get(index, {})
        entry = optimizer["state"].setdefault(index, {})
        for key in keys:
            entry[key] = torch.cat([part["optimizer"][index][key] for part in parts], dim)


def _linears(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"


@register("tensor")
class TensorParallel(Strategy):
    """The plan's Linear layers cut over groups of ``tp`` ranks (columns / rows); world / tp groups train data
    parallel, each on its share of the batch."""

    Options = TensorOptions
    not_compiled = NOT_COMPILED["tensor"]
    builds_on_meta = True  # a run builds the model without storage; setup keeps each split layer's slice only

    def __init__(self, *, tp: int | None = None, plan: dict[str, str] | None = None,
                 grad_clip: float | None = None) -> None:  # fmt: skip
        self.tp, self.plan, self.grad_clip = tp, plan, grad_clip
        self.split: dict[nn.Parameter, tuple[int, torch.Size]] = {}  # split parameter -> (dim, whole shape)
        self.layers: list[tuple[str, nn.Linear, str]] = []
        self.group: Any = None  # the tensor-parallel group (this rank's slice: group.rank)
        self.dp: Any = None  # the same slice in every replica (None with one replica)
        # (input, its _CopyToGroup) of this forward: q, k and v share one
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self._whole = True
        self.group_sums = 0  # all-reduces over the group so far (forward and backward of the split layers)

    def _size(self, world: World) -> int:
        tp = self.tp or world.size
        if world.size % tp:
            raise ConfigError(
                f"[parallel] tp = {tp} must divide the {world.size} ranks (ranks = replicas x tp)"
            )
        return tp

    def data_shards(self, world: World) -> tuple[int, int]:
        """(this rank's share of each batch, number of shares): one per replica; a group's ranks share one."""
        tp = self._size(world)
        return world.rank // tp, world.size // tp

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> nn.Module:
        """Find the plan's layers, start every rank from rank 0's weights, and route the layers' forward through
        their slices. A model built on the meta device is materialised one module at a time, each split layer cut
        to this rank's slice at once (the whole model never exists); a whole model is cut at the first step."""
        tp = self._size(world)
        self.model, self.optimizer, self.world = model, optimizer, world
        self.layers = plan_layers(model, self.plan, tp)
        replica, self.replicas = world.rank // tp, world.size // tp
        self.group = world.comm if self.replicas == 1 else world.comm.split(replica, world.rank % tp)
        self.dp = None if self.replicas == 1 else world.comm.split(world.rank % tp, replica)
        kinds = {id(layer): kind for _, layer, kind in self.layers}
        meta = on_meta(model)
        if meta:

            def keep(_: str, module: nn.Module) -> None:
                self._bcast([*module.parameters(recurse=False), *module.buffers(recurse=False)])
                if tp > 1 and id(module) in kinds:
                    self._cut_layer(module, kinds[id(module)], cut=True)

            materialize(model, keep, world.device, optimizer)
        else:
            self._bcast([*model.parameters(), *model.buffers()])
        if tp == 1:  # nothing to cut: plain data parallel over the replicas
            return model
        for _, layer, kind in self.layers:
            if not meta:
                self._cut_layer(layer, kind, cut=False)
            forward = self._colwise if kind == "colwise" else self._rowwise
            layer.forward = functools.partial(forward, layer)  # an instance attribute: close() removes it
        self._hooks.append(model.register_forward_pre_hook(self._new_forward))
        self._whole = not meta
        return model

    def _bcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` on every rank (collective): ranks start from one model."""
        with torch.no_grad():
            for t in tensors:
                self.world.comm.Bcast(t.data if t.is_contiguous() else t.data.contiguous(), root=0)

    def _cut_layer(self, layer: nn.Linear, kind: str, cut: bool) -> None:
        """Record the layer's split parameters (and keep only this rank's slice now, if ``cut``)."""
        r, tp = self.group.rank, self.group.size
        params = [layer.weight] + ([layer.bias] if layer.bias is not None and kind == "colwise" else [])
        for p in params:  # a rowwise bias is added once, after the sum: whole on every rank
            dim = 0 if kind == "colwise" or p is layer.bias else 1
            self.split[p] = (dim, p.shape)
            if cut:
                p.data = p.data.chunk(tp, dim)[r].clone()

    def local_state(self, shared: dict[str, Any]) -> dict[str, Any]:
        """While this rank holds only its slices (a model built on the meta device), a checkpoint's state is cut to
        them: the split weights and their optimizer state, taken one tensor at a time from the shard files of a
        shard-wise checkpoint (memory-mapped: the whole model is never joined here) or from a whole one."""
        if self._whole or not self.split:
            return shared
        r, tp = self.group.rank, self.group.size
        names = {p: n for n, p in self.model.named_parameters()}
        ordered = (p for g in self._base_optimizer().param_groups for p in g["params"])
        index = {id(p): i for i, p in enumerate(ordered)}
        layout = shared.get("sharded_layout") or {}
        parts = None
        if layout.get("kind") == "tensor" and "sharded_parts" in shared:
            parts = sorted(shared["sharded_parts"], key=lambda part: part["shard"])
            if [part["shard"] for part in parts] != list(range(layout["size"])):
                raise ValueError(f"the checkpoint has {layout['size']} tensor shards, {len(parts)} were read")
        cut = {p["name"]: (p["dim"], p["index"]) for p in layout.get("params", [])} if parts else {}
        optimizer = shared["optimizer"]
        while "state" not in optimizer:  # fp16-mixed's wrapper
            optimizer = optimizer["optimizer"]
        model = dict(shared["model"])

        def mine(pieces: list[torch.Tensor], along: int, dim: int) -> torch.Tensor:
            # The pieces are memory-mapped; joined, one whole tensor exists for a moment, then only the slice.
            return torch.cat(pieces, along).chunk(tp, dim)[r].clone()

        for p, (dim, shape) in self.split.items():
            name, i = names[p], index[id(p)]
            if name in cut:  # joined from the ranks' slices (along their dim), then cut anew
                d, j = cut[name]
                model[name] = mine([part["model"][name] for part in parts], d, dim)
                keys = parts[0]["optimizer"].get(j, {})
                entry = optimizer["state"].setdefault(i, {})
                for key in keys:
                    entry[key] = mine([part["optimizer"][j][key] for part in parts], d, dim)
                continue
            model[name] = model[name].chunk(tp, dim)[r]
            entry = optimizer["state"].get(i, {})
            for key, value in entry.items():
                if torch.is_tensor(value) and value.shape == shape:
                    entry[key] = value.chunk(tp, dim)[r]
        out = {**shared, "model": model}
        if parts is not None:
            out.pop("sharded_parts")
        return out

    def shard(self, model: nn.Module, group: Communicator) -> nn.Module:
        """Inference: route the plan's layers of ``model``, whose split parameters already hold this rank's slices
        of ``group`` (``materialize_shard``), through the group; nothing is broadcast, no optimizer is kept."""
        self.model, self.group = model, group
        self.layers = plan_layers(model, self.plan, group.size)
        if group.size == 1:
            return model
        for _, layer, kind in self.layers:
            forward = self._colwise if kind == "colwise" else self._rowwise
            layer.forward = functools.partial(forward, layer)
        self._hooks.append(model.register_forward_pre_hook(self._new_forward))
        self._whole = False
        return model

    # -- the split layers' forward ---------------------------------------------------------------------------------
    def sum_over_group(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the tensor-parallel group, in place (collective over the group)."""
        self.group_sums += 1
        _allreduce(self.group, t)

    def _new_forward(self, *_: Any) -> None:
        self._shared = None

    def _colwise(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self._whole:
            return F.linear(x, layer.weight, layer.bias)
        # q, k and v read the same input: one copy, so backward sums their gradients and all-reduces once.
        if self._shared is None or self._shared[0] is not x:
            self._shared = (x, _CopyToGroup.apply(x, self))
        return F.linear(self._shared[1], layer.weight, layer.bias)

    def _rowwise(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self._whole:
            return F.linear(x, layer.weight, layer.bias)
        y = _ReduceFromGroup.apply(F.linear(x, layer.weight), self)
        return y if layer.bias is None else y + layer.bias

    # -- slices and whole weights ---------------------------------------------------------------------------------
    def _cut(self) -> None:
        """Keep this rank's slice of each split weight and of its optimizer state; free the rest."""
        r, tp = self.group.rank, self.group.size
        for p, (dim, shape) in self.split.items():
            p.data = p.data.chunk(tp, dim)[r].clone()
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == shape:
                    state[key] = value.chunk(tp, dim)[r].clone()
        self._whole = False

    def synchronize(self) -> None:
        """Give every rank the whole model again: each split weight and its optimizer state gathered from the slices
        (collective over the group; until the next training step cuts them)."""
        if self._whole:
            return
        for p, (dim, shape) in self.split.items():
            sliced = p.data.shape
            p.data = self._gather(p.data, dim, shape)
            state = self.optimizer.state.get(p, {})
            for key in sorted(state):
                if torch.is_tensor(state[key]) and state[key].shape == sliced:
                    state[key] = self._gather(state[key], dim, shape)
        self._whole = True

    def _gather(self, piece: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
        tp = self.group.size
        out = torch.empty(tp * piece.numel(), dtype=piece.dtype, device=piece.device)
        self.group.Allgather(piece.contiguous(), out)
        return out.view(tp, *piece.shape).movedim(0, dim).reshape(shape).contiguous()

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def train_batch(
        self, net: nn.Module, x: Any, y: torch.Tensor, loss_fn: Callable, scale: float, precision: Any,
        accumulate: int = 1, offload: bool = False, non_finite: Callable[[torch.Tensor], Exception] | None = None,
    ) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """Cut the weights if they are whole, then forward and backward as one process would (see Strategy)."""
        if precision.mode not in ("fp32", "bf16-mixed", "fp16-mixed"):
            raise ConfigError(
                f"the tensor strategy runs [precision] mode fp32, bf16-mixed or fp16-mixed, not {precision.mode!r} "
                "(bf16-true keeps fp32 master copies of the whole weights beside the slices)"
            )
        if self._whole and self.split:
            self._cut()
        return super().train_batch(net, x, y, loss_fn, scale, precision, accumulate, offload, non_finite)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate: the split layers' all-reduces run inside autograd; replicas average in ``step``."""
        loss.backward()

    def step(self) -> None:
        """Average the replicas' gradients, clip by the norm over the whole model (if asked), step, zero."""
        self._shared = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.dp is not None:
            for p in params:  # a parameter unused this step still takes part, with zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            _allreduce(self.dp, flat)
            flat /= self.replicas
            at = 0
            for p in params:
                p.grad.copy_(flat[at : at + p.numel()].view_as(p))
                at += p.numel()
        if self.grad_clip or self.measure_grad_norm:
            norm = self._norm(params)
            if self.grad_clip and norm > self.grad_clip:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(self.grad_clip / (norm + 1e-6))
            self._grad_norm = norm if self.measure_grad_norm else None
        self._step_optimizer()
        self.optimizer.zero_grad(set_to_none=True)

    def _norm(self, params: list[nn.Parameter]) -> float:
        """The gradients' 2-norm over the whole model: slices summed over the group, shared parameters once."""
        sq = [float(p.grad.double().pow(2).sum()) if p.grad is not None else 0.0 for p in params]
        sliced = sum(s for p, s in zip(params, sq) if p in self.split)
        shared = sum(s for p, s in zip(params, sq) if p not in self.split)
        return (self.group.allreduce(sliced) + shared) ** 0.5

    def _step_optimizer(self) -> None:
        scaler = getattr(self.optimizer, "scaler", None)  # fp16-mixed's LossScaledOptimizer
        if scaler is None:
            self.optimizer.step()
            return
        # A rank sees only its slices: the ranks agree on an overflow anywhere, then all skip the step and lower
        # the loss scale together (or none does), so the group keeps one scale and one model.
        mine = all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)
        finite = self.world.comm.allreduce(int(mine), op="min") == 1
        if scaler.record(finite):
            self.optimizer.optimizer.step()

    def consolidate(self, purpose: Purpose) -> None:
        """Validation runs on the slices and shard-wise checkpoints write them; a plain checkpoint and whole
        final outputs get the whole model (gathered)."""
        if purpose in ("checkpoint", "outputs"):
            self.synchronize()

    def _base_optimizer(self) -> torch.optim.Optimizer:
        base = self.optimizer
        while not isinstance(base, torch.optim.Optimizer) and hasattr(base, "optimizer"):
            base = base.optimizer  # fp16-mixed's wrapper
        return base

    def sharded_state(self) -> dict[str, Any] | None:
        """Each rank of the first replica writes its slices of the split weights and of their optimizer state
        (nothing is gathered); None while the weights are whole (before the first step, or tp = 1)."""
        if self._whole or not self.split:
            return None
        tp = self.group.size
        ordered = (p for g in self._base_optimizer().param_groups for p in g["params"])
        index = {id(p): i for i, p in enumerate(ordered)}
        names = {p: n for n, p in self.model.named_parameters()}
        layout = {"kind": "tensor", "size": tp, "files": [f"rank-{r:05d}.pt" for r in range(tp)],
                  "params": [{"name": names[p], "index": index[id(p)], "dim": dim, "shape": list(shape)}
                             for p, (dim, shape) in self.split.items()]}  # fmt: skip
        if self.world.rank >= tp:  # another replica: the same slices as the first one's
            return {"layout": layout, "state": None}
        state = self.optimizer.state
        return {"layout": layout, "state": {
            "shard": self.group.rank,
            "model": {names[p]: p.detach() for p in self.split},
            "optimizer": {index[id(p)]: {k: v.detach() for k, v in state.get(p, {}).items()
                                         if torch.is_tensor(v) and v.shape == p.shape} for p in self.split},
        }}  # fmt: skip

    def write_sharded_weights(self, directory: Path) -> bool:
        """The final weights shard-wise (collective): each rank of the first replica writes its slices into
        ``directory``, rank 0 also every tensor no layer cuts and the layout, last; the directory appears
        complete under its name or not at all."""
        if self._whole or not self.split:
            return False
        tp, rank = self.group.size, self.world.rank
        tmp = directory.with_name(f".{directory.name}.partial")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.world.barrier()
        names = {p: n for n, p in self.model.named_parameters()}
        if rank < tp:
            mine = {names[p]: p.detach().cpu() for p in self.split}
            atomic_write(tmp / _shard_file(rank), lambda f: torch.save(mine, f))
        if rank == 0:
            cut = {names[p] for p in self.split}
            rest = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k not in cut}
            atomic_write(tmp / SHARED, lambda f: torch.save(rest, f))
        self.world.barrier()
        if rank == 0:
            layout = {"kind": "tensor", "size": tp,
                      "params": [{"name": names[p], "dim": d, "shape": list(s)} for p, (d, s) in self.split.items()]}  # fmt: skip
            atomic_write_text(tmp / LAYOUT, json.dumps(layout, indent=2))
            replace_directory(tmp, directory)
        self.world.barrier()
        return True

    def held(self) -> int:
        """Parameters (elements) this rank holds now: the slices of the split layers and every other parameter."""
        return sum(p.numel() for p in self.model.parameters())

    def state_dict(self) -> dict[str, Any]:
        """The layout, for the record: checkpoints hold the whole model, so a resume may cut it anew."""
        tp = self.group.size if self.group is not None else None
        return {"tp": tp, "replicas": getattr(self, "replicas", 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the whole weights and optimizer state come with the trainer's state."""

    def close(self) -> None:
        """Restore the layers' own forward and release the group and replica communicators."""
        for _, layer, _ in self.layers:
            layer.__dict__.pop("forward", None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.dp is not None:
            self.group.Free()
            self.dp.Free()
            self.dp = None
