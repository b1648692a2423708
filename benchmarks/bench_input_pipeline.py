"""Input pipeline: Caldera's scientific pipeline vs. a newcomer's DataLoader over h5py, feeding the same CNN.

    python benchmarks/bench_input_pipeline.py [--gb 1.5] [--steps 120] [--workers 2] [--backend process]

Writes an HDF5 file of heat-diffusion-style fields (T0, k -> T on a 128x128 grid, float32, chunks of 16 records)
to a temporary directory, then trains the same small CNN for the same number of steps of batch 32 twice, with the
same transform (random 96x96 crop, per-variable normalisation, a spectral low-pass filter of T0, a signed log of
k):

(a) newcomer: a ``torch.utils.data.Dataset`` whose ``__getitem__`` reads one sample with h5py, default collate,
    ``shuffle=True``, ``num_workers=0``: what the tutorials show;
(b) caldera: ``caldera.data.scientific.dataset`` with chunk-ordered shuffled batch reads and background workers.

Before each variant the file is dropped from the page cache (posix_fadvise), so both read from disk. Both are
timed by the same ``InputMeter``: samples/s and the fraction of step time spent waiting for the next batch.
The data file is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from caldera.data import normalize, scientific
from caldera.data.formats import open_reader
from caldera.data.prefetch import InputMeter

GRID, CROP, CHUNK = 128, 96, 16
# --smoke: a 5 MB file (about 34 records), three steps of batch 4 per variant, once.
SMOKE = {"gb": 0.005, "steps": 3, "repeats": 1, "batch": 4}


def smooth_fields(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Return ``n`` random smooth fields: white noise low-pass filtered in Fourier space."""
    noise = rng.standard_normal((n, GRID, GRID), dtype=np.float32)
    ky, kx = np.fft.fftfreq(GRID)[:, None], np.fft.rfftfreq(GRID)[None, :]
    spectrum = np.fft.rfft2(noise) * np.exp(-(kx**2 + ky**2) / (2 * scale**2))
    return np.fft.irfft2(spectrum, s=(GRID, GRID)).astype(np.float32) * (GRID * scale * 4)


def write_file(path: Path, gb: float, seed: int = 0) -> int:
    """Write T0, k and T (T0 diffused with conductivity k) with ``gb`` GB in total; return the record count."""
    import h5py

    n = int(gb * 1e9 // (3 * GRID * GRID * 4))
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        dsets = {
            v: f.create_dataset(v, (n, GRID, GRID), "f4", chunks=(CHUNK, GRID, GRID))
            for v in ("T0", "k", "T")
        }
        for lo in range(0, n, 256):
            m = min(256, n - lo)
            t0 = smooth_fields(rng, m, 0.04) + 2.0
            k = np.exp(smooth_fields(rng, m, 0.02))  # log-normal conductivity: heavy-tailed, hence the log
            t = t0 + 0.1 * k * (smooth_fields(rng, m, 0.01) - t0 + 2.0)
            dsets["T0"][lo : lo + m], dsets["k"][lo : lo + m], dsets["T"][lo : lo + m] = t0, k, t
    return n


def drop_from_page_cache(path: Path) -> None:
    """Make the next reads come from disk: flush the file and tell the kernel to drop its cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def transform(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random crop per sample, low-pass filter channel 0 spectrally, signed log of channel 1 (normalised input)."""
    n = len(x)
    oy, ox = rng.integers(0, GRID - CROP + 1, size=(2, n))
    xc = np.stack([x[i, :, oy[i] : oy[i] + CROP, ox[i] : ox[i] + CROP] for i in range(n)])
    yc = np.stack([y[i, :, oy[i] : oy[i] + CROP, ox[i] : ox[i] + CROP] for i in range(n)])
    ky, kx = np.fft.fftfreq(CROP)[:, None], np.fft.rfftfreq(CROP)[None, :]
    low_pass = np.exp(-(kx**2 + ky**2) / (2 * 0.15**2))
    xc[:, 0] = np.fft.irfft2(np.fft.rfft2(xc[:, 0]) * low_pass, s=(CROP, CROP))
    xc[:, 1] = np.sign(xc[:, 1]) * np.log1p(np.abs(xc[:, 1]))
    return xc.astype(np.float32), yc.astype(np.float32)


def make_model(c: int = 8) -> nn.Module:
    """A small encoder-decoder CNN for field-to-field regression, ``c`` channels at full resolution."""
    return nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1), nn.GELU(),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
        nn.ConvTranspose2d(2 * c, c, 2, stride=2), nn.GELU(),
        nn.Conv2d(c, 1, 3, padding=1),
    )  # fmt: skip


class NewcomerDataset(torch.utils.data.Dataset):
    """One sample per ``__getitem__``, read with h5py from a file opened once, normalised, transformed."""

    def __init__(self, path: Path, stats: dict) -> None:
        import h5py

        self.file = h5py.File(path, "r")
        self.stats = stats
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.file["T"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stats
        x = np.stack([s["T0"].apply(self.file["T0"][i]), s["k"].apply(self.file["k"][i])])
        y = s["T"].apply(self.file["T"][i])[None]
        x, y = transform(x[None], y[None], self.rng)
        return torch.from_numpy(x[0]), torch.from_numpy(y[0])


def train(batches, steps: int, channels: int) -> tuple[float, InputMeter]:
    """Train the CNN on ``steps`` batches; return the wall time and the input meter."""
    torch.manual_seed(0)
    model = make_model(channels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meter = InputMeter()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(meter.wrap(batches)):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 == steps:
            break
    return time.perf_counter() - t0, meter


def newcomer(path: Path, stats: dict, args: argparse.Namespace):
    loader = torch.utils.data.DataLoader(NewcomerDataset(path, stats), batch_size=args.batch, shuffle=True)
    return train(loader, args.steps, args.channels)


def caldera_pipeline(path: Path, stats: dict, args: argparse.Namespace):
    data = scientific.dataset(str(path), inputs=["T0", "k"], targets=["T"], transform=transform,
                              backend=args.backend, val_fraction=0.0, run_dir=path.parent)["train"]  # fmt: skip
    batches = data.batches(args.batch, num_workers=args.workers, seed=0)
    batches.set_epoch(0)
    try:
        return train(((x, y) for (x, y), _, _ in batches), args.steps, args.channels)
    finally:
        batches.close()


def in_memory(path: Path, stats: dict, args: argparse.Namespace):
    """The model alone: one batch prepared in advance and reused, no input cost (the ceiling)."""
    x, y = transform(np.zeros((args.batch, 2, GRID, GRID), np.float32), np.zeros((args.batch, 1, GRID, GRID),
                     np.float32), np.random.default_rng(0))  # fmt: skip
    x, y = torch.from_numpy(x).normal_(), torch.from_numpy(y).normal_()
    return train(((x, y) for _ in range(args.steps)), args.steps, args.channels)


VARIANTS = {"newcomer": newcomer, "caldera": caldera_pipeline, "no input": in_memory}


def run_all(path: Path, stats: dict, args: argparse.Namespace) -> dict[str, list[tuple[float, float, float]]]:
    """Run every variant ``repeats`` times, alternating, each from a cold page cache."""
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, fn in VARIANTS.items():
            drop_from_page_cache(path)
            seconds, meter = fn(path, stats, args)
            s = meter.stats
            results[name].append((s.steps * args.batch / seconds, s.wait_fraction, s.first_wait_s))
            print(f"  repeat {repeat + 1} {name:9s} {results[name][-1][0]:7.1f} samples/s, waiting "
                  f"{100 * s.wait_fraction:5.1f} % (first batch {s.first_wait_s:.2f} s)", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.5, help="size of the generated HDF5 file")
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=8, help="CNN width")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="process", choices=["thread", "process"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model (all variants)")
    parser.add_argument(
        "--dir", default=None, help="where to write the file (default: a temporary directory)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="caldera-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "fields.h5"
    try:
        t0 = time.perf_counter()
        n = write_file(path, args.gb)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {n} records of 3 x {GRID}x{GRID} float32, "
              f"chunks of {CHUNK} records) in {time.perf_counter() - t0:.0f} s")  # fmt: skip
        drop_from_page_cache(path)
        t0 = time.perf_counter()
        stats = normalize.compute_stats(open_reader(path), ["T0", "k", "T"])
        print(f"normalisation pass over the whole file (cold cache): {time.perf_counter() - t0:.1f} s")
        normalize.save_stats(
            stats, workdir / normalize.STATS_FILE, {"path": str(path.resolve()), "records": [0, n]}
        )
        print(f"CNN {sum(p.numel() for p in make_model(args.channels).parameters()):,} parameters, batch "
              f"{args.batch}, {args.steps} steps x {args.repeats} repeats, {args.threads} torch thread(s), "
              f"{os.cpu_count()} cores; caldera: {args.workers} {args.backend} workers")  # fmt: skip
        results = run_all(path, stats, args)
        print("medians:")
        med = {name: np.median(np.array(r), axis=0) for name, r in results.items()}
        for name, (rate, wait, first) in med.items():
            print(f"{name:9s} {rate:7.1f} samples/s  waiting for data {100 * wait:5.1f} % of step time "
                  f"(first batch {first:.2f} s)")  # fmt: skip
        print(f"samples/s ratio caldera / newcomer = {med['caldera'][0] / med['newcomer'][0]:.2f}; "
              f"caldera / no-input ceiling = {med['caldera'][0] / med['no input'][0]:.2f}")  # fmt: skip
    finally:
        if args.keep:
            print(f"kept {path}")
        elif args.dir:
            path.unlink(missing_ok=True)
            (workdir / normalize.STATS_FILE).unlink(missing_ok=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
