"""Caldera's tensor strategy vs. PyTorch's DTensor tensor parallel (torch.distributed.tensor.parallel over gloo).

    python benchmarks/bench_tensor.py [--ranks 2] [--dim 256] [--layers 2] [--batch 32] [--repeats 3]

Same model (the built-in ``transformer``: q/k/v and mlp.up column-parallel, attn.out and mlp.down row-parallel, the
same plan for both), same batch, N ranks x 1 thread, alternating R times; also one process alone (1 thread, whole
model). Prints medians of samples/s, the ratio to PyTorch, and the parameter elements each rank holds while
training. The worker half of this file runs inside the ranks (``--worker``).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
from pathlib import Path

from _common import bench_parser, measured_run, parse, report_rate

HERE = Path(__file__).resolve()
TOKENS, FEATURES = 32, 16
# --smoke: each row once, two steps of a small model.
SMOKE = {"repeats": 1, "steps": 2, "batch": 4, "dim": 32, "layers": 1}


def build(dim: int, layers: int):
    import torch

    from caldera.models import Transformer

    torch.manual_seed(0)
    return Transformer(
        in_features=FEATURES, out_features=8, dim=dim, heads=8, layers=layers, max_tokens=TOKENS
    )


def worker(mode: str, dim: int, layers: int, batch: int, steps: int) -> None:
    import fnmatch

    import torch
    from torch import nn

    from caldera.parallel.tensor import DEFAULT_PLAN

    torch.set_num_threads(1)
    model, loss_fn = build(dim, layers), nn.MSELoss()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, TOKENS, FEATURES, generator=g), torch.randn(batch, 8, generator=g)
    rank = 0
    if mode in ("alone", "torch"):
        if mode == "torch":
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group("gloo", rank=rank, world_size=size)
            kinds = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            # Caldera's default plan, spelled out per module for parallelize_module (the same layers cut).
            plan = {n: kinds[k]() for n, _ in model.named_modules() for p, k in DEFAULT_PLAN.items()
                    if n and fnmatch.fnmatchcase(n, p)}  # fmt: skip
            parallelize_module(model, init_device_mesh("cpu", (size,)), plan)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def one_step():
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def held() -> int:
            return sum(
                p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()
            )

    else:
        import caldera

        world = caldera.init(seed=0)
        rank = world.rank
        trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn, world=world,
                                  strategy="tensor", progress=False, plot=False)  # fmt: skip

        def one_step():
            trainer.train_step(x, y)

        def held() -> int:
            return trainer.strategy.held()

    report_rate(one_step, batch, steps, rank)
    if rank == 0:
        print(f"held={held()}", flush=True)
    if mode == "torch":
        import torch.distributed as dist

        # Together: a rank tearing gloo down while the other still talks aborts ("terminate called ...").
        dist.barrier()
        dist.destroy_process_group()


def run(cmd: list[str]) -> tuple[float, int]:
    """Samples/s and parameter elements held by rank 0 of one measured run."""
    rate, printed = measured_run(cmd)
    held = re.search(r"held=(\d+)", printed)
    if not held:
        raise RuntimeError(f"{' '.join(cmd)} printed no held=:\n{printed}")
    return rate, int(held.group(1))


def main() -> None:
    p = bench_parser(
        __doc__, ("MODE", "DIM", "LAYERS", "BATCH", "STEPS"), steps=10, dim=256, layers=2, batch=32
    )
    args = parse(p, SMOKE, worker)
    if args is None:  # this process was a rank
        return
    from caldera.launch import build_command

    n, me = args.ranks, [sys.executable, str(HERE), "--worker"]
    spec = [str(args.dim), str(args.layers), str(args.batch), str(args.steps)]
    results: dict[str, list[tuple[float, int]]] = {"alone": [], "torch": [], "caldera": []}
    for _ in range(args.repeats):
        results["alone"].append(run([*me, "alone", *spec]))
        for mode in ("torch", "caldera"):
            results[mode].append(run(build_command(n, [*me, mode, *spec])))
    med = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    print(f"transformer dim {args.dim}, {args.layers} blocks, 8 heads, {TOKENS} tokens, batch {args.batch}, {n} ranks x "
          f"1 thread, {args.steps} steps, {args.repeats} repeats (medians)")  # fmt: skip
    print(f"  one process alone                       {med['alone']:7.1f} samples/s  "
          f"{results['alone'][0][1]:>9,} parameters")  # fmt: skip
    for mode, label in (("torch", "DTensor tensor parallel (gloo)"), ("caldera", "Caldera tensor (MPI)")):
        runs = ", ".join(f"{r:.1f}" for r, _ in results[mode])
        print(f"  {label:38s} {med[mode]:7.1f} samples/s  {results[mode][0][1]:>9,} per rank  "
              f"x{med[mode] / med['torch']:.2f} torch   [{runs}]")  # fmt: skip


if __name__ == "__main__":
    main()
