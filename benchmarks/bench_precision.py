"""Training speed per precision: caldera.Trainer against a hand-written torch.autocast (+ GradScaler) loop.

    python benchmarks/bench_precision.py [--model mlp unet] [--steps 30] [--epochs 4] [--repeats 3]

Both loops train the same model from the same weights on the same device-resident data, batches and optimizer
(Adam), ``epochs`` passes over ``steps`` batches, so per-run set-up costs are amortised as in a real run; runs
alternate so machine noise hits both. Prints samples/s of each, the ratio Trainer / hand loop
(Caldera's overhead) and each precision's speed-up over fp32 (what bf16/fp16 buy on this device). On a GPU the
sizes are GPU-sized; on a CPU they shrink and only fp32 runs by default (CPUs without bf16 matrix units run
autocast bf16 tens of times slower: ask for it with --precisions fp32 bf16-mixed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.models import MLP, UNetSmall

AMP = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
# --smoke: both models, two batches, one epoch, once.
SMOKE = {"steps": 2, "epochs": 1, "repeats": 1}


def problem(kind: str, device: torch.device, steps: int) -> tuple[callable, TensorDataset, int, nn.Module]:
    """Return a model factory, a device-resident dataset of ``steps`` batches, the batch size and the loss."""
    gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        sizes, batch = ([4096, 8192, 8192, 8192, 10], 4096) if gpu else ([1024, 2048, 2048, 10], 256)
        x, y = (
            torch.randn(steps * batch, sizes[0], generator=g),
            torch.randint(0, 10, (steps * batch,), generator=g),
        )
        return (lambda: MLP(sizes)), TensorDataset(x.to(device), y.to(device)), batch, nn.CrossEntropyLoss()
    channels, side, batch = (64, 128, 64) if gpu else (16, 32, 16)
    x = torch.randn(steps * batch, 2, side, side, generator=g)
    y = torch.randn(steps * batch, 1, side, side, generator=g)
    return (lambda: UNetSmall(2, 1, channels)), TensorDataset(x.to(device), y.to(device)), batch, nn.MSELoss()


def hand_loop(
    model: nn.Module, data: TensorDataset, batch: int, loss_fn: nn.Module, precision: str, epochs: int
):
    """The loop a user would write: autocast around forward+loss, GradScaler for fp16."""
    device = data.tensors[0].device
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")
    x, y = data.tensors
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        hand_epoch(model, opt, scaler, x, y, perm, batch, loss_fn, precision)


def hand_epoch(model, opt, scaler, x, y, perm, batch, loss_fn, precision) -> None:
    """One pass over the data in the order ``perm``."""
    for i in range(len(x) // batch):
        idx = perm[i * batch : (i + 1) * batch]
        with torch.autocast(x.device.type, dtype=AMP[precision], enabled=AMP[precision] is not None):
            loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def trainer_loop(
    model: nn.Module, data: TensorDataset, batch: int, loss_fn: nn.Module, precision: str, epochs: int
):
    """The same training through caldera.Trainer (progress bar on, plots off)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    trainer = caldera.Trainer(model, opt, loss_fn, max_epochs=epochs, batch_size=batch, drop_last=True,
                              precision=precision, plot=False)  # fmt: skip
    trainer.fit(data)


def timed(fn, make_model, data, batch, loss_fn, precision, device, epochs) -> float:
    """Samples per second of one training run, with the device drained before and after."""
    torch.manual_seed(0)
    model = make_model().to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(model, data, batch, loss_fn, precision, epochs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs * len(data) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["mlp", "unet"], nargs="+", default=["mlp", "unet"])
    parser.add_argument("--steps", type=int, default=30, help="batches in the data set")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the data per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precisions", nargs="+", default=None, help="default: all three on a GPU, fp32 on a CPU"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    world = caldera.init()
    device = world.device
    precisions = args.precisions or (list(AMP) if device.type == "cuda" else ["fp32"])
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# {time.strftime('%Y-%m-%d')}  {name}, torch {torch.__version__}, median of {args.repeats} repeats"
    )
    for kind in args.model:
        make_model, data, batch, loss_fn = problem(kind, device, args.steps)
        params = sum(p.numel() for p in make_model().parameters())
        print(
            f"\n{kind}: {params / 1e6:.1f} M parameters, batch {batch}, {args.epochs} x {args.steps} steps per run"
        )
        print(
            f"{'precision':<11} {'hand samples/s':>15} {'caldera samples/s':>18} {'caldera/hand':>13} {'vs fp32':>8}"
        )
        for precision in precisions:  # one warm-up of each loop: cuDNN autotuning, allocator, lazy inits
            for fn in (hand_loop, trainer_loop):
                timed(fn, make_model, data, batch, loss_fn, precision, device, 1)
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for precision in precisions:
                for fn in (hand_loop, trainer_loop):
                    rate = timed(fn, make_model, data, batch, loss_fn, precision, device, args.epochs)
                    rates.setdefault((precision, fn.__name__), []).append(rate)
        base = statistics.median(rates[(precisions[0], "trainer_loop")])
        for precision in precisions:
            hand = statistics.median(rates[(precision, "hand_loop")])
            ours = statistics.median(rates[(precision, "trainer_loop")])
            print(
                f"{precision:<11} {hand:>15.0f} {ours:>18.0f} {ours / hand:>12.3f}x {ours / base:>7.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
