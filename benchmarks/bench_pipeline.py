"""Caldera's pipeline strategy vs. PyTorch's own pipelining (torch.distributed.pipelining over gloo), same schedule.

    python benchmarks/bench_pipeline.py [--ranks 2] [--micro-batches 4] [--schedule gpipe|1f1b] [--repeats 3]
                                        [--busy] [--profile]

Same model (an MLP of 4 equal 2048-wide hidden layers), same stage split, same global batch and micro-batches,
N ranks x 1 thread, alternating R times. Also one process alone (1 thread, whole model): the ideal for N stages is
N x alone x m / (m + N - 1) (GPipe's bubble). Prints medians of samples/s, the ratio to PyTorch and the share of
that ideal. ``--busy`` keeps one spinning Python process (a neighbour job) running through every measurement.
``--profile`` instead runs each pipeline once more and prints, per rank, wall and CPU seconds of the timed steps
and the top of a cProfile of rank 0 (where the time goes: compute or waits). The worker half of this file runs
inside the ranks (``--worker``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import bench_parser, measured_run, report_rate

HERE = Path(__file__).resolve()
WIDTH, DEPTH = 2048, 4
# --smoke: each row once, two steps of a small batch.
SMOKE = {"repeats": 1, "steps": 2, "batch": 16}


def build():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Linear(1024, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def worker(mode: str, batch: int, micro: int, steps: int, schedule_name: str) -> None:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    model, loss_fn = build(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 1024, generator=g), torch.randint(0, 10, (batch,), generator=g)
    rank = 0
    if mode == "alone":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def one_step():
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif mode == "torch":
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from caldera.parallel.pipeline import stage_bounds

        rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=rank, world_size=size)
        start, stop = stage_bounds(model, size)[rank]  # the split Caldera makes, for a like-for-like race
        part = nn.Sequential(*list(model)[start:stop])
        kind = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
        schedule = kind(PipelineStage(part, rank, size, torch.device("cpu")), micro, loss_fn=loss_fn)
        opt = torch.optim.SGD(part.parameters(), lr=0.01)

        def one_step():
            if rank == 0:
                schedule.step(x)
            elif rank == size - 1:
                schedule.step(target=y, losses=[])
            else:
                schedule.step()
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        import caldera

        world = caldera.init(seed=0)
        rank = world.rank
        trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn, world=world,
                                  strategy="pipeline",
                                  strategy_options={"micro_batches": micro, "pipeline_schedule": schedule_name},
                                  progress=False, plot=False)  # fmt: skip

        def one_step():
            trainer.train_step(x, y)

    if os.environ.get("BENCH_PIPELINE_PROFILE"):
        profile(one_step, steps, rank)
    else:
        report_rate(one_step, batch, steps, rank)
    if mode == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()


def profile(one_step, steps: int, rank: int) -> None:
    """Time ``steps`` steps after 3 warm-up ones: wall and CPU seconds on every rank, cProfile's top on rank 0."""
    import cProfile
    import pstats
    import time

    for _ in range(3):
        one_step()
    prof = cProfile.Profile()
    wall, cpu = time.perf_counter(), time.process_time()
    prof.enable()
    for _ in range(steps):
        one_step()
    prof.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"rank {rank}: {wall:.2f} s wall, {cpu:.2f} s CPU ({100 * cpu / wall:.0f} % of one core)", flush=True
    )
    if rank == 0:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(8)


@contextlib.contextmanager
def neighbour(busy: bool):
    """With ``busy``: one process spinning on a core (another job on the node) for as long as the block runs."""
    if not busy:
        yield
        return
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spin.kill()
        spin.wait()


def main() -> None:
    p = bench_parser(
        __doc__, ("MODE", "BATCH", "MICRO", "STEPS", "SCHED"), steps=20, micro_batches=4, batch=256
    )
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe", help="for both pipelines")
    p.add_argument(
        "--busy", action="store_true", help="a spinning neighbour process through every measurement"
    )
    p.add_argument("--profile", action="store_true", help="wall/CPU seconds per rank and cProfile of rank 0")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.worker:
        mode, batch, micro, steps, sched = args.worker
        worker(mode, int(batch), int(micro), int(steps), sched)
        return
    from caldera.launch import build_command

    n, m, me = args.ranks, args.micro_batches, [sys.executable, str(HERE), "--worker"]
    spec = [str(args.batch), str(m), str(args.steps), args.schedule]
    if args.profile:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_PIPELINE_PROFILE": "1", "MASTER_PORT": "29517"}
        with neighbour(args.busy):
            for mode in ("torch", "caldera"):
                print(f"== {mode} ({args.schedule}{', busy' if args.busy else ''})", flush=True)
                subprocess.run(build_command(n, [*me, mode, *spec]), env=env, check=True, timeout=300)
        return
    results: dict[str, list[float]] = {"alone": [], "torch": [], "caldera": []}
    with neighbour(args.busy):
        for _ in range(args.repeats):
            results["alone"].append(measured_run([*me, "alone", *spec])[0])
            for mode in ("torch", "caldera"):
                results[mode].append(measured_run(build_command(n, [*me, mode, *spec]))[0])
    med = {k: statistics.median(v) for k, v in results.items()}
    ideal = n * med["alone"] * m / (m + n - 1)
    print(f"MLP 1024-{WIDTH}x{DEPTH}-10, batch {args.batch} in {m} micro-batches ({args.schedule}), {n} stages x 1 thread, "
          f"{args.steps} steps, {args.repeats} repeats (medians){', a spinning neighbour' if args.busy else ''}")  # fmt: skip
    print(f"one process alone: {med['alone']:.0f} samples/s -> GPipe ideal for {n} stages {ideal:.0f}")
    for mode, label in (
        ("torch", "torch.distributed.pipelining (gloo)"),
        ("caldera", "Caldera pipeline (MPI)"),
    ):
        runs = ", ".join(f"{v:.0f}" for v in results[mode])
        print(f"  {label:38s} {med[mode]:7.0f} samples/s  {100 * med[mode] / ideal:5.1f} % of ideal  "
              f"x{med[mode] / med['torch']:.2f} torch   [{runs}]")  # fmt: skip


if __name__ == "__main__":
    main()
