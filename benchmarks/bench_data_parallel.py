"""Caldera's all-reduce data parallel vs. PyTorch DDP (gloo), same model, same global batch, same run.

    python benchmarks/bench_data_parallel.py [--ranks 2] [--repeats 3] [--steps 20] [--models mlp cnn]
                                             [--grad-comm bf16] [--optimizer sgd|adam] [--shard] [--unfused]

For each model it measures, alternating, R times: one rank alone (1 thread, per-rank batch) -> ideal = N x that;
DDP-gloo on N ranks x 1 thread; Caldera ``allreduce`` on N ranks x 1 thread. Prints medians of samples/s, the
ratio Caldera / DDP and each one's scaling efficiency against ideal. Targets: >= 1.4x DDP on the MLP, >= 90 % of
ideal on both, never slower than DDP. The row "no communication" is N ranks each training alone on its per-rank
batch at the same time: what the machine allows before any byte is exchanged (shared memory bandwidth, caches,
clock); "lockstep" adds a barrier after every step (the bound of any synchronous method on a host whose
cores' speed wanders: each step waits for the slower rank), and each row also prints its share of that bound.
``--grad-comm bf16`` (or fp16) adds rows for Caldera with 16-bit gradient
communication, both reducers; ``--shard`` rows with the optimizer state sharded over the ranks (``shard_optimizer``),
which matters with ``--optimizer adam`` (two state tensors per parameter to update); ``--unfused`` rows with
PyTorch's own weight-gradient accumulation instead of Caldera's fused linear gradients (``fused_linear_grads``). The worker half of this file runs inside the ranks (``--worker``).
Models: ``mlp`` (6.3 M parameters), ``cnn`` (1.1 M) and ``grad25m`` (ResNet-50's conv and fc weights as cheap linear
branches, 25.5 M parameters: its gradient without its compute; ``grad25m_model``; use a small ``--batch``, e.g. 8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from _common import measured_run, report_rate

HERE = Path(__file__).resolve()
# --smoke: the lockstep bound, DDP and Caldera's default reducer once, on the MLP, a few small steps (each Caldera row
# passes every strategy option, so the optional rows differ only in values).
SMOKE = {"repeats": 1, "steps": 2, "batch": 16, "models": ["mlp"]}


# -- worker: runs inside each rank ---------------------------------------------------------------------------------
def resnet50_weight_shapes() -> list[tuple[int, int]]:
    """(out, in x kh x kw) of ResNet-50's 53 convolutions: stem, 16 bottlenecks of 3 (+4 downsamples)."""
    shapes, cin = [(64, 3 * 7 * 7)], 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for i in range(blocks):
            shapes += [(width, cin), (width, width * 9), (width * 4, width)]
            shapes += [(width * 4, cin)] if i == 0 else []  # the block's downsample
            cin = width * 4
    return shapes


def grad25m_model():
    """ResNet-50's gradient at a fraction of its compute: its 53 conv weights and its fc (25.50 M parameters).

    Each conv weight is a bias-free ``nn.Linear(in*kh*kw, out)`` applied to a slice of the same small input (the
    layers are branches, not a chain, so their shapes need not match), and each branch's mean is added to the fc's
    1 000 logits: 55 parameter tensors of ResNet-50's sizes (BatchNorm's 53 k left out), gradients produced in
    reverse layer order as in a real backward, and a forward/backward of a few GEMVs per sample, so that the step
    is mostly the communication of a ResNet-50-sized gradient (100 MB in fp32).
    """
    import torch
    from torch import nn

    class Grad25M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in resnet50_weight_shapes())
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = 0
            for conv in self.convs:
                out = out + conv(x[:, : conv.in_features]).mean(dim=1, keepdim=True)
            return self.fc(x[:, :2048]) + out

    return Grad25M()


def worker(kind: str, mode: str, global_batch: int, steps: int, optim: str = "sgd") -> None:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
        )
    elif kind == "grad25m":
        model = grad25m_model()
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
        )  # fmt: skip
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.01)
        if optim == "sgd"
        else torch.optim.Adam(model.parameters())
    )
    loss_fn = nn.CrossEntropyLoss()
    rank, size = 0, 1
    if mode.startswith("ddp"):  # ddp | ddp-tuned[-BUCKET_MB] | ddp-fp16 (its fp16 compression hook)
        import torch.distributed as dist

        rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29541")
        dist.init_process_group("gloo", rank=rank, world_size=size)
        # As DDP's users tune it: gradients as views into the buckets, a static graph, the bucket size swept.
        tuned = (
            {"gradient_as_bucket_view": True, "static_graph": True} if mode.startswith("ddp-tuned") else {}
        )
        if mode.startswith("ddp-tuned-"):
            tuned["bucket_cap_mb"] = float(mode.rsplit("-", 1)[1])
        net = nn.parallel.DistributedDataParallel(model, **tuned)
        if mode == "ddp-fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            net.register_comm_hook(None, default_hooks.fp16_compress_hook)

        def backward(loss):
            loss.backward()

        def step():
            opt.step()
            opt.zero_grad()
    elif mode.startswith("caldera"):
        import caldera

        world = caldera.init()
        rank, size = world.rank, world.size
        # mode: caldera[-mpi][-bf16|-fp16][-zero][-unfused][-blocking][-bMB]; -blocking: the shm reducer's step
        # between nodes ends before backward goes on (comm/shm.py); -bMB: gradient buckets of MB MiB (default 25)
        words = mode.split("-")
        grad_comm = next((w for w in words if w in ("bf16", "fp16")), "fp32")
        bucket_mb = next(
            (float(w[1:]) for w in words if w[:1] == "b" and w[1:].replace(".", "").isdigit()), 25.0
        )
        strategy = caldera.parallel.make_strategy(
            "allreduce",
            reducer="mpi" if "mpi" in words else "auto",
            grad_comm=grad_comm,
            shard_optimizer="zero" in words,
            fused_linear_grads="unfused" not in words,
            bucket_mb=bucket_mb,
        )
        net = strategy.setup(model, opt, world)
        if "blocking" in words:
            if strategy.node is None:
                raise SystemExit(
                    f"{mode}: '-blocking' is the shm reducer's, but this run uses {strategy.reducer}"
                )
            strategy.node.blocking = True
        backward, step = strategy.backward, strategy.step
    else:  # "single": one rank alone; "nocomm": N ranks side by side, no communication; "lockstep": + a barrier
        barrier = lambda: None  # noqa: E731
        if mode in ("nocomm", "lockstep"):
            rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        if mode == "lockstep":
            from mpi4py import MPI

            barrier = MPI.COMM_WORLD.Barrier
        net = model

        def backward(loss):
            loss.backward()

        def step():
            opt.step()
            opt.zero_grad()
            barrier()

    b = global_batch // size
    shape = {"mlp": (1024,), "grad25m": (max(i for _, i in resnet50_weight_shapes()),)}.get(kind, (3, 32, 32))
    x = torch.randn(b, *shape)
    y = torch.randint(0, 10, (b,))

    def one_step():
        backward(loss_fn(net(x), y))
        step()

    report_rate(one_step, global_batch, steps, rank)
    if mode.startswith("ddp"):
        # gloo's teardown (destroy_process_group) has hung after complete, timed runs, costing the driver its
        # timeout each time: every collective has returned by now, so leave without it (no MPI in these ranks).
        sys.stdout.flush()
        os._exit(0)


# -- driver ------------------------------------------------------------------------------------------------------------
def run(cmd: list[str]) -> float:
    """Samples/s of one measured run (``bench_cluster`` and ``bench_pipeline`` start theirs through this too)."""
    return measured_run(cmd, timeout=120)[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "grad25m"])
    parser.add_argument(
        "--grad-comm", choices=["bf16", "fp16"], help="also measure Caldera with this gradient communication"
    )
    parser.add_argument(
        "--optimizer", choices=["sgd", "adam"], default="sgd", help="the optimizer every run uses"
    )
    parser.add_argument("--shard", action="store_true",
                        help="also measure Caldera with the optimizer state sharded over the ranks (shard_optimizer)")  # fmt: skip
    parser.add_argument("--unfused", action="store_true",
                        help="also measure Caldera without fused linear weight gradients (fused_linear_grads = false)")  # fmt: skip
    parser.add_argument(
        "--worker", nargs=5, metavar=("KIND", "MODE", "GBATCH", "STEPS", "OPTIM"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.worker:
        kind, mode, gbatch, steps, optim = args.worker
        worker(kind, mode, int(gbatch), int(steps), optim)
        return
    from caldera.launch import build_command

    n, me = args.ranks, [sys.executable, str(HERE), "--worker"]
    print(
        f"{n} ranks x 1 thread, global batch {args.batch}, {args.steps} timed steps, {args.repeats} repeats (medians), "
        f"optimizer {args.optimizer}"
    )
    for kind in args.models:
        modes = ["nocomm", "lockstep", "ddp", "caldera", "caldera-mpi"]
        if (
            args.smoke
        ):  # the peer and the lockstep bound the rows are printed against, and Caldera's default reducer
            modes = ["lockstep", "ddp", "caldera"]
        if args.unfused:
            modes += ["caldera-unfused", "caldera-mpi-unfused"]
        if args.grad_comm:
            modes += [f"caldera-{args.grad_comm}", f"caldera-mpi-{args.grad_comm}"]
        if args.shard:
            modes += ["caldera-zero", "caldera-mpi-zero"]
        results: dict[str, list[float]] = {m: [] for m in ["single", *modes]}
        for _ in range(args.repeats):
            results["single"].append(
                run([*me, kind, "single", str(args.batch // n), str(args.steps), args.optimizer])
            )
            for mode in modes:
                results[mode].append(
                    run(build_command(n, [*me, kind, mode, str(args.batch), str(args.steps), args.optimizer]))
                )
        med = {m: statistics.median(v) for m, v in results.items()}
        ideal = n * med["single"]
        print(f"\n{kind}: one rank alone {med['single']:.0f} samples/s -> ideal {ideal:.0f}")
        labels = {
            "nocomm": "no communication (bound)",
            "lockstep": "lockstep, no data (sync bound)",
            "ddp": "DDP-gloo",
            "caldera": "Caldera allreduce (auto: shm)",
            "caldera-mpi": "Caldera allreduce (mpi)",
            f"caldera-{args.grad_comm}": f"Caldera (auto: shm) {args.grad_comm} comm",
            f"caldera-mpi-{args.grad_comm}": f"Caldera (mpi) {args.grad_comm} comm",
            "caldera-zero": "Caldera (auto: shm), sharded opt.",
            "caldera-mpi-zero": "Caldera (mpi), sharded opt.",
            "caldera-unfused": "Caldera (auto: shm), unfused",
            "caldera-mpi-unfused": "Caldera (mpi), unfused",
        }
        for mode in modes:
            runs = ", ".join(f"{v:.0f}" for v in results[mode])
            print(f"  {labels[mode]:30s} {med[mode]:7.0f} samples/s  {100 * med[mode] / ideal:5.1f} % of ideal  "
                  f"{100 * med[mode] / med['lockstep']:5.1f} % of lockstep  x{med[mode] / med['ddp']:.2f} DDP   "
                  f"[{runs}]")  # fmt: skip


if __name__ == "__main__":
    main()
