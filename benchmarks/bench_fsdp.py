"""Caldera's ZeRO-3 (allreduce with shard_params) vs. PyTorch's FSDP2 and ZeroRedundancyOptimizer, on CPU ranks.

    python benchmarks/bench_fsdp.py [--ranks 2] [--dim 256] [--layers 4] [--batch 32] [--steps 10] [--repeats 3]

Same model (the built-in ``transformer``), same batch, Adam, N ranks x 1 thread, the three alternating R times:

- Caldera: ``allreduce`` with ``shard_optimizer``, ``shard_gradients`` and ``shard_params`` (MPI), the model built on
  the meta device and materialised shard by shard;
- FSDP2: ``torch.distributed.fsdp.fully_shard`` on each block and then on the root, ``reshard_after_forward=True``
  (its documented default and recommended per-block wrapping), gloo;
- ZeRO-1: DDP with ``gradient_as_bucket_view=True`` and ``torch.distributed.optim.ZeroRedundancyOptimizer``, gloo.

Prints medians of samples/s and of the peak resident memory (RSS high-water mark) of the worst rank, and the ratios
to each peer. The worker half of this file runs inside the ranks (``--worker``).
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import sys
from pathlib import Path

from _common import bench_parser, measured_run, parse, report_rate

HERE = Path(__file__).resolve()
TOKENS, FEATURES = 32, 16
# --smoke: each row once, two steps of a small model.
SMOKE = {"repeats": 1, "steps": 2, "batch": 4, "dim": 32, "layers": 2}


def worker(mode: str, dim: int, layers: int, batch: int, steps: int) -> None:
    import torch
    from torch import nn

    from caldera.models import Transformer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, TOKENS, FEATURES, generator=g), torch.randn(batch, 8, generator=g)
    loss_fn = nn.MSELoss()
    args = {
        "in_features": FEATURES,
        "out_features": 8,
        "dim": dim,
        "heads": 8,
        "layers": layers,
        "max_tokens": TOKENS,
    }
    if mode == "caldera":
        import caldera

        world = caldera.init(seed=0)
        rank, size = world.rank, world.size
        with torch.device("meta"):  # never whole on a rank
            model = Transformer(**args)
        options = {"shard_optimizer": True, "shard_gradients": True, "shard_params": True}
        trainer = caldera.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-4), loss_fn, world=world,
                                  strategy="allreduce", strategy_options=options, progress=False, plot=False)  # fmt: skip
        xs, ys = x.tensor_split(size)[rank], y.tensor_split(size)[rank]

        def one_step():
            trainer.train_step(xs, ys)

    else:
        import torch.distributed as dist

        rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=rank, world_size=size)
        xs, ys = x.tensor_split(size)[rank], y.tensor_split(size)[rank]
        if mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (size,))
            with torch.device("meta"):  # as its docs build large models: then to_empty + init per rank
                model = Transformer(**args)
            for block in model.blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=True)
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
            model.to_empty(device="cpu")
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            net, opt = model, torch.optim.Adam(model.parameters(), lr=1e-4)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            from torch.nn.parallel import DistributedDataParallel

            model = Transformer(**args)
            net = DistributedDataParallel(model, gradient_as_bucket_view=True)
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-4)

        def one_step():
            loss_fn(net(xs), ys).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    report_rate(one_step, batch, steps, rank)
    # Every rank's high-water mark (Linux reports KiB).
    print(f"peak_rank{rank}={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}", flush=True)
    if mode != "caldera":
        import torch.distributed as dist

        dist.barrier()  # together: a rank tearing gloo down while another still talks aborts
        # And no teardown at all: with DDP's reducer (or FSDP's hooks) still alive, gloo's destructors at interpreter
        # exit sometimes end the process with std::terminate (exit -6) after the results were printed.
        sys.stdout.flush()
        os._exit(0)


def run(cmd: list[str]) -> tuple[float, float]:
    """Samples/s and the worst rank's peak RSS (MiB) of one measured run."""
    rate, printed = measured_run(cmd, timeout=600)
    peaks = re.findall(r"peak_rank\d+=([\d.]+)", printed)
    if not peaks:
        raise RuntimeError(f"{' '.join(cmd)} printed no peak memory:\n{printed}")
    return rate, max(map(float, peaks))


def main() -> None:
    p = bench_parser(
        __doc__, ("MODE", "DIM", "LAYERS", "BATCH", "STEPS"), steps=10, dim=256, layers=4, batch=32
    )
    args = parse(p, SMOKE, worker)
    if args is None:  # this process was a rank
        return
    from caldera.launch import build_command

    n, me = args.ranks, [sys.executable, str(HERE), "--worker"]
    spec = [str(args.dim), str(args.layers), str(args.batch), str(args.steps)]
    modes = ("fsdp2", "zero1", "caldera")
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # alternating, so a change in the machine's load hits all three alike
        for mode in modes:
            results[mode].append(run(build_command(n, [*me, mode, *spec])))
    rate = {m: statistics.median(r for r, _ in v) for m, v in results.items()}
    peak = {m: statistics.median(k for _, k in v) for m, v in results.items()}
    print(f"transformer dim {args.dim}, {args.layers} blocks, 8 heads, {TOKENS} tokens, Adam, batch {args.batch}, "
          f"{n} ranks x 1 thread, {args.steps} steps, {args.repeats} repeats (medians)")  # fmt: skip
    labels = {"fsdp2": "FSDP2 fully_shard per block (gloo)", "zero1": "DDP + ZeroRedundancyOptimizer (gloo)",
              "caldera": "Caldera ZeRO-3 shard_params (MPI)"}  # fmt: skip
    for mode in modes:
        runs = ", ".join(f"{r:.1f}" for r, _ in results[mode])
        print(
            f"  {labels[mode]:38s} {rate[mode]:7.1f} samples/s  peak RSS {peak[mode]:6.1f} MiB/rank  [{runs}]"
        )
    for peer in ("fsdp2", "zero1"):
        print(f"  Caldera vs {labels[peer].split(' (')[0]}: x{rate['caldera'] / rate[peer]:.2f} samples/s, "
              f"x{peak['caldera'] / peak[peer]:.2f} peak memory")  # fmt: skip


if __name__ == "__main__":
    main()
