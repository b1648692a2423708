"""Export the main job's heat surrogate and run it without Python's model code: the AOTInductor package.

    python examples/export_heat.py                       # exports runs/heat-surrogate (trains it first if needed)
Smoke run (seconds): python examples/export_heat.py --smoke

Trains ``examples/heat_surrogate.toml`` unless its run directory already holds a finished run, then runs
``caldera export`` on it (safetensors, TorchScript, ExportedProgram + AOTInductor, ONNX; each verified against the
eager model on the run's validation plates; ``model.json`` describes them). Finally it loads the AOTInductor
package, a compiled shared library, as a C or Fortran code would through Caldera's C API, runs it on plates the
model never saw, and compares it with the solver it stands in for and with the eager model. See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch._inductor import aoti_load_package

from caldera.config import load_config
from caldera.export import export
from caldera.predict import load_run_config
from caldera.sims import heat
from caldera.train.run import load_run_model, train
from caldera.train.rundir import RunDir

RUN_FILE = Path(__file__).with_name("heat_surrogate.toml")
# --smoke: a small model on a few small plates, one epoch.
SMOKE = ["data.args.n_samples=200", "data.args.grid=16", "model.args.channels=4", "optim.epochs=1",
         "train.progress=false", "train.plot=false"]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/heat-surrogate", help="a finished run to export (else trained)")
    p.add_argument("--formats", default="safetensors,torchscript,pt2,onnx")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    run_dir = Path(args.run_dir)
    if RunDir(run_dir).missing():
        cfg = load_config(RUN_FILE, [*(SMOKE if args.smoke else []), f"run.dir={run_dir}"])
        train(cfg, RUN_FILE)

    # --smoke: only the package this script loads (tests/test_export.py checks every format against the eager model).
    result = export(run_dir, ["pt2"] if args.smoke else args.formats.split(","))
    if result.code:
        return result.code
    card = json.loads((result.out / "model.json").read_text())
    grid, steps = card["inputs"][0]["shape"][-1], card["config"]["data"]["args"]["steps"]

    # Plates the model never saw (another seed), the solver's answer, and the eager model's.
    x, y = heat.generate(8, grid, steps, seed=12345)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    compiled = aoti_load_package(str(result.out / "model.aoti.pt2"))
    eager = load_run_model(RunDir(run_dir), load_run_config(run_dir)).eval()
    with torch.no_grad():
        got, want = compiled(x), eager(x)  # one output: one tensor (a tuple model: a tuple)
        print(f"AOTInductor vs eager: max abs difference {(got - want).abs().max():.2e}")
        print(f"AOTInductor vs the solver: relative L2 error {((got - y).norm() / y.norm()):.3f}")
        for name, fn in (("eager", eager), ("AOTInductor", compiled)):
            fn(x[:1])  # warm
            t0, calls = time.perf_counter(), 20
            for _ in range(calls):
                fn(x[:1])
            print(f"{name:>12}: {(time.perf_counter() - t0) / calls * 1e3:.3f} ms per plate (batch 1)")
    print(f"package metadata: {compiled.get_metadata()}")
    assert np.isfinite(got.numpy()).all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
