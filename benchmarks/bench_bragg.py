"""Bragg-peak localisation at the instrument: centre error (pixels) and time per 11x11 patch of BraggNN (fp32,
bf16, int8 through ONNX Runtime) and of a leaner variant, against the classical pseudo-Voigt fit (scipy) measured
in the same run; FLOPs per patch, the machine's measured peak, and what the FPGA's 4.8 µs per patch would need.

    python benchmarks/bench_bragg.py                                   # trains both models first (minutes)
    python benchmarks/bench_bragg.py --run runs/bragg --lean-run runs/bragg-lean
    python benchmarks/bench_bragg.py --smoke                           # seconds: tiny training, sizes, repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from caldera.config import load_config
from caldera.export import export
from caldera.export.quantize import quantize_onnx
from caldera.io import atomic_write_text
from caldera.sims import bragg
from caldera.train.run import load_run_model, train
from caldera.train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = ROOT / "examples" / "bragg.toml"
# The lean variant: no convolutions, no attention, a perceptron on the 121 pixels (0.14 MFLOP per patch).
LEAN = ["model.args.channels=[]", "model.args.dense=[256, 128, 64]", "model.args.nonlocal_block=false"]
FPGA_US = 4.8  # OpenHLS's BraggNN on an FPGA, per patch
TEST_SEED = 2024  # patches no run trains or validates on (those use the run's seed and seed + 1)
FULL = {
    "test": 4000,
    "fit": 1000,
    "batch": 4096,
    "latency_calls": 300,
    "repeats": 5,
    "gemm": 2048,
    "train": [],
}
SMOKE = {"test": 200, "fit": 40, "batch": 256, "latency_calls": 20, "repeats": 1, "gemm": 256,
         "train": ["data.args.n=1500", "optim.epochs=1", "data.batch_size=128"]}  # fmt: skip


def gemm_peak(n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of an n x n x n matrix product on the current torch threads, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    cases = {"fp32": (a, b, torch.mm), "bf16": (a.bfloat16(), b.bfloat16(), torch.mm),
             "int8": (a.mul(40).to(torch.int8), b.mul(40).to(torch.int8), torch._int_mm)}  # fmt: skip
    out = {}
    for name, (x, y, mm) in cases.items():
        mm(x, y)  # warm up (and let oneDNN pick its kernel)
        best = min(_seconds(mm, x, y) for _ in range(max(3, repeats)))
        out[name] = 2 * n**3 / best / 1e9
    return out


def _seconds(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def flops_per_patch(model: torch.nn.Module) -> float:
    """FLOPs of one forward pass on one patch (torch's counter: 2 per multiply-add of convolutions and products)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 1, bragg.SIZE, bragg.SIZE))
    return float(counter.get_total_flops())


def get_run(given: str | None, overrides: list[str], name: str, scratch: Path, settings: dict) -> Path:
    """A trained run directory: the one given, or a run of examples/bragg.toml trained now."""
    if given:
        return Path(given)
    run_dir = scratch / name
    cfg = load_config(RUN_FILE, [*overrides, *settings["train"], f"run.dir={run_dir}", "train.progress=false",
                                 "train.plot=false"])  # fmt: skip
    started = time.perf_counter()
    train(cfg)
    print(f"trained {name} in {time.perf_counter() - started:.0f} s -> {run_dir}")
    return run_dir


def paths(run_dir: Path, model: torch.nn.Module, calibration: np.ndarray, threads: int) -> dict[str, object]:
    """name -> a function of a float32 batch (n, 1, 11, 11) returning centres (n, 2), for each inference path."""

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    def bf16(x: np.ndarray) -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(x)).float().numpy()

    onnx = export(run_dir, ["onnx"], out=run_dir / "export", echo=False).out / "model.onnx"
    int8 = quantize_onnx(onnx, calibration, run_dir / "export" / "model.int8.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    out = {"fp32 torch": eager, "bf16 torch autocast": bf16}
    for label, file in (("fp32 ONNX Runtime", onnx), ("int8 ONNX Runtime", int8)):
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        out[label] = lambda x, s=session: s.run(None, {"x": x})[0]
    return out


def time_path(fn, x: np.ndarray, batch: int, calls: int, repeats: int) -> tuple[float, float]:
    """(µs per patch at ``batch``, median µs of one call at batch 1)."""
    big = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    fn(big)
    per_patch = min(_seconds(fn, big) for _ in range(repeats)) / batch
    one = np.ascontiguousarray(x[:1])
    for _ in range(10):
        fn(one)
    latency = statistics.median(_seconds(fn, one) for _ in range(calls))
    return per_patch * 1e6, latency * 1e6


def main() -> None:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds: tiny training, sizes and repeats")
    p.add_argument("--run", help="a trained run of examples/bragg.toml (default: train one now)")
    p.add_argument("--lean-run", help="a trained run of the lean variant (default: train one now)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()
    s = SMOKE if args.smoke else FULL
    torch.set_num_threads(args.threads)
    peak = gemm_peak(s["gemm"], s["repeats"])
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads; GEMM {s['gemm']}^3: fp32 {peak['fp32']:.0f} "
          f"GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s, int8 {peak['int8']:.0f} GOP/s (torch._int_mm)")  # fmt: skip
    test = bragg.patches(s["test"], seed=TEST_SEED)
    x = test.counts[:, None]
    fitted, fit_s = bragg.fit(test.counts[: s["fit"]])
    fit_err = bragg.summary(bragg.errors_px(fitted, test.centre[: s["fit"]]))
    centroid_err = bragg.summary(bragg.errors_px(bragg.centroid(test.counts), test.centre))
    print(f"{len(x)} test patches (seed {TEST_SEED}); the fit on the first {s['fit']}: {fit_s * 1e6:.0f} µs/patch, "
          f"median {fit_err['median_px']:.4f} px, p95 {fit_err['p95_px']:.4f} px; centroid: median "
          f"{centroid_err['median_px']:.4f} px, p95 {centroid_err['p95_px']:.4f} px")  # fmt: skip
    calibration = bragg.patches(1024, seed=0).counts[:, None]  # training-stream patches: real detector data
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, given, overrides in (("bragg", args.run, []), ("bragg-lean", args.lean_run, LEAN)):
            run_dir = get_run(given, overrides, name, Path(scratch), s)
            files = RunDir(run_dir)
            model = load_run_model(files, load_config(files.read_config())).eval()
            flops = flops_per_patch(model)
            reference = None
            for label, fn in paths(run_dir, model, calibration, args.threads).items():
                pred = np.concatenate([fn(x[i : i + 1024]) for i in range(0, len(x), 1024)]) * (
                    bragg.SIZE - 1
                )
                reference = pred if reference is None else reference
                err = bragg.summary(bragg.errors_px(pred, test.centre))
                us, latency = time_path(fn, x, s["batch"], s["latency_calls"], s["repeats"])
                dtype = label.split()[0]
                rows.append({"model": name, "path": label, "mflop": flops / 1e6, **err,
                             "max_dev_px": float(bragg.errors_px(pred, reference).max()), "us_per_patch": us,
                             "latency_us": latency, "gflops": flops / us / 1e3,
                             "peak_fraction": flops / us / 1e3 / peak[dtype], "vs_fit": fit_s * 1e6 / us})  # fmt: skip
    print(f"\n{'model':<11} {'path':<20} {'MFLOP':>6} {'median px':>9} {'p95 px':>7} {'dev px':>7} "
          f"{'µs/patch':>8} {'GFLOP/s':>7} {'of peak':>7} {'batch-1 µs':>10} {'x fit':>7}")  # fmt: skip
    print(f"{'fit':<11} {'scipy least_squares':<20} {'':>6} {fit_err['median_px']:9.4f} {fit_err['p95_px']:7.4f} "
          f"{'':>7} {fit_s * 1e6:8.1f} {'':>7} {'':>7} {fit_s * 1e6:10.1f} {1:7.0f}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:<11} {r['path']:<20} {r['mflop']:6.2f} {r['median_px']:9.4f} {r['p95_px']:7.4f} "
              f"{r['max_dev_px']:7.4f} {r['us_per_patch']:8.2f} {r['gflops']:7.1f} {r['peak_fraction']:7.0%} "
              f"{r['latency_us']:10.1f} {r['vs_fit']:7.0f}")  # fmt: skip
    print(f"\n(batch {s['batch']} for µs/patch; 'dev px': largest distance from the same model's fp32 torch output; "
          f"'of peak': against the GEMM peak of the path's number type)")  # fmt: skip
    for name in ("bragg", "bragg-lean"):
        mflop = next(r["mflop"] for r in rows if r["model"] == name)
        need = mflop * 1e6 / (FPGA_US * 1e-6) / 1e9
        print(f"{name}: {FPGA_US} µs/patch needs {need:.0f} GFLOP/s sustained = {need / peak['fp32']:.1f}x the fp32 "
              f"peak, {need / peak['bf16']:.1f}x bf16, {need / peak['int8']:.1f}x int8")  # fmt: skip
    if args.out:
        result = {"peak": peak, "fit": {**fit_err, "us_per_patch": fit_s * 1e6}, "centroid": centroid_err,
                  "rows": rows, "settings": {k: v for k, v in s.items() if k != "train"}, "threads": args.threads}  # fmt: skip
        atomic_write_text(Path(args.out), json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
