"""caldera predict over an ensemble: mean and spread of several models on every rank, streamed to disk."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from caldera.cli import main
from caldera.config import load_config
from caldera.registry.publish import publish
from caldera.train.run import build_model, train
from tests.conftest import ROOT, run_ranks

h5py = pytest.importorskip("h5py")
N = 40  # records of 8x8 fields


def _train(tmp, name, seed, targets=("a", "b"), path="fields.h5", normalize=True):
    cfg = load_config({
        "run": {"dir": str(tmp / name), "seed": seed},
        "model": {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1 + 2 * ("b" in targets),
                                                 "channels": 4}},
        "data": {"source": "scientific", "batch_size": 8, "val_fraction": 0.25,
                 "args": {"path": str(tmp / path), "inputs": ["x"], "targets": list(targets),
                          "normalize": normalize}},
        "optim": {"epochs": 1, "lr": 3e-3}, "train": {"metrics": ["mae"], "progress": False, "plot": False},
    })  # fmt: skip
    torch.manual_seed(seed)
    train(cfg)
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two members trained on one HDF5 file (different seeds), one on other targets, both published."""
    tmp = tmp_path_factory.mktemp("ensemble")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2, 8, 8)).astype(np.float32)
    a = (300 + 5 * x[:, 0] + rng.normal(scale=0.5, size=(N, 8, 8))).astype(np.float32)
    b = (-2 + 0.1 * x[:, ::-1]).astype(np.float32)
    with h5py.File(tmp / "fields.h5", "w") as f:
        f["x"], f["a"], f["b"] = x, a, b
    one, two, other = _train(tmp, "one", 0), _train(tmp, "two", 1), _train(tmp, "other", 0, targets=("a",))
    for run in (one, two):
        publish(run, "heat-ens", registry=tmp / "registry", formats=["safetensors"], samples=4, echo=False)
    return tmp, one, two, other


def _eager(tmp, runs):
    """Each member by hand: normalise with the training records' statistics, run it, undo the targets'."""
    with h5py.File(tmp / "fields.h5") as f:
        x, a, b = f["x"][:], f["a"][:], f["b"][:]
    outs = []
    for run in runs:
        model = build_model(load_config(json.loads((run / "config.resolved.json").read_text())))
        model.load_state_dict(torch.load(run / "model.pt"))
        with torch.no_grad():
            outs.append(model(torch.from_numpy((x - x[:30].mean()) / x[:30].std())).numpy())
    outs = np.stack(outs)
    phys = np.concatenate([outs[:, :, :1] * a[:30].std() + a[:30].mean(),
                           outs[:, :, 1:] * b[:30].std() + b[:30].mean()], 2)  # fmt: skip
    target = np.concatenate(
        [((a - a[:30].mean()) / a[:30].std())[:, None], (b - b[:30].mean()) / b[:30].std()], 1
    )
    return phys.mean(0), phys.std(0), float(((outs.mean(0) - target) ** 2).mean())


@pytest.mark.mpi
def test_two_ranks_write_the_ensembles_mean_and_spread_of_registry_members(runs, capsys):
    tmp, one, two, other = runs
    mean, std, loss = _eager(tmp, [one, two])
    proc = run_ranks(2, ["-m", "caldera.cli", "predict", "heat-ens@1", "heat-ens@latest", "--split", "all",
                         "--batch-size", "3", "--out", str(tmp / "ens.h5")],
                     env={"CALDERA_REGISTRY": str(tmp / "registry")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(tmp / "ens.h5") as f:
        np.testing.assert_allclose(f["prediction"][:], mean, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(f["prediction_std"][:], std, rtol=1e-3, atol=1e-3)
        assert f.attrs["models"] == 2 and f.attrs["samples"] == N
    assert std.mean() > 1e-3  # the members differ: the spread is not trivially zero
    report = json.loads((tmp / "ens.json").read_text())
    assert report["all_loss"] == pytest.approx(loss, rel=1e-4)  # the scores are the mean's
    assert report["ranks"] == 2 and report["samples_per_s_per_rank"] > 0 and report["samples_per_s"] > 0
    assert proc.stderr.count("samples/s per rank") == 1 and proc.stdout.count("all_loss") == 1
    assert not list(tmp.glob(".*partial*"))  # nothing staged is left; the output appeared whole
    # One process, run directories as members, .npy and .nc outputs: the same numbers.
    assert main(["predict", str(one), str(two), "--split", "all", "--out", str(tmp / "ens.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp / "ens.npy"), mean, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.load(tmp / "ens.std.npy"), std, rtol=1e-3, atol=1e-3)
    assert main(["predict", str(one), str(two), "--out", str(tmp / "ens.nc")]) == 0
    netCDF4 = pytest.importorskip("netCDF4")
    with netCDF4.Dataset(tmp / "ens.nc") as nc:
        np.testing.assert_allclose(nc["b_std"][:], std[30:, 1:], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(nc["a"][:], mean[30:, 0], rtol=1e-4, atol=1e-3)
    # Members on another data pipeline: one line naming the first difference, exit 2.
    capsys.readouterr()
    assert main(["predict", str(one), str(other), "--out", str(tmp / "bad.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.args.targets" in err and str(other) in err
    assert not (tmp / "bad.npy").exists()


MEASURE = """
import resource, sys
from caldera.predict import predict
run, tmp = sys.argv[1], sys.argv[2]
for size in ("1x", "4x"):
    predict([run, run], "all", [f"data.args.path={tmp}/{size}.h5", "data.args.targets=[]"],
            out=f"{tmp}/{size}.out.h5", batch_size=16, score=False, progress=False)
    print(size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)  # MiB at peak
"""


def test_memory_stays_bounded_when_the_input_grows_fourfold(tmp_path):
    """Peak RSS after predicting 4x the samples is the 1x peak: predictions stream to disk, a batch at a time."""
    rng = np.random.default_rng(2)
    grid, small = 64, 300
    x = rng.normal(size=(small, 2, grid, grid)).astype(np.float32)
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["x"], f["a"], f["b"] = x[:16], x[:16, 0], x[:16]
    run = _train(tmp_path, "run", 0, path="train.h5", normalize=False)
    for size, k in (("1x", 1), ("4x", 4)):
        with h5py.File(tmp_path / f"{size}.h5", "w") as f:
            f["x"] = np.concatenate([x] * k)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(run), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = dict(line.split() for line in proc.stdout.splitlines() if line[:2] in ("1x", "4x"))
    grown = int(peak["4x"]) - int(peak["1x"])
    extra = (
        3 * small * grid * grid * 4 * 2 * 3 / 2**20
    )  # MiB of mean + spread the 4x run adds over the 1x one
    assert grown < 0.25 * extra, (
        peak,
        extra,
    )  # holding them (as before streaming) would grow by more than all
    with h5py.File(tmp_path / "4x.out.h5") as f:
        assert (
            f["prediction"].shape == (4 * small, 3, grid, grid) and f["prediction_std"].shape[0] == 4 * small
        )
        np.testing.assert_array_equal(
            f["prediction"][-small:], f["prediction"][:small]
        )  # the input, repeated
