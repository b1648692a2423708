"""caldera predict: a finished run's model applied to its data on any number of ranks, in physical units."""

import json

import numpy as np
import pytest
import torch

from caldera.cli import main
from caldera.config import ConfigError, load_config
from caldera.predict import predict
from caldera.train.run import build_model, train
from tests.conftest import run_ranks

h5py = pytest.importorskip("h5py")
N = 40  # records of 8x8 fields


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short training run on an HDF5 file whose targets live far from 0 (normalised for training)."""
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2, 8, 8)).astype(np.float32)
    a = (300 + 5 * x[:, 0] + rng.normal(scale=0.5, size=(N, 8, 8))).astype(np.float32)  # a field, kelvin-like
    b = (-2 + 0.1 * x[:, ::-1]).astype(np.float32)  # a field with 2 channels
    with h5py.File(tmp / "fields.h5", "w") as f:
        f["x"], f["a"], f["b"] = x, a, b
    cfg = load_config({
        "run": {"dir": str(tmp / "run")},
        "model": {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 3, "channels": 4}},
        "data": {"source": "scientific", "batch_size": 8, "val_fraction": 0.25,
                 "args": {"path": str(tmp / "fields.h5"), "inputs": ["x"], "targets": ["a", "b"]}},
        "optim": {"epochs": 2, "lr": 3e-3}, "train": {"metrics": ["mae"], "progress": False, "plot": False},
    })  # fmt: skip
    train(cfg)
    return tmp


def test_predictions_are_the_models_outputs_in_physical_units_and_scores_match_training(run):
    scores = predict(run / "run", "val", out=run / "out" / "val.npy", progress=False)
    last = json.loads((run / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert scores["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert scores["val_mae"] == pytest.approx(last["val_mae"], rel=1e-5)
    assert json.loads((run / "out" / "val.json").read_text())["samples"] == scores["samples"] == 10
    pred = np.load(run / "out" / "val.npy")
    # By hand: normalise with the training records' statistics, run the model, undo the targets' normalisation.
    with h5py.File(run / "fields.h5") as f:
        x, a, b = f["x"][:], f["a"][:], f["b"][:]
    mean_x, std_x = x[:30].mean(), x[:30].std()
    model = build_model(load_config(json.loads((run / "run" / "config.resolved.json").read_text())))
    model.load_state_dict(torch.load(run / "run" / "model.pt"))
    with torch.no_grad():
        out = model(torch.from_numpy((x[30:] - mean_x) / std_x)).numpy()
    want = np.concatenate(
        [out[:, :1] * a[:30].std() + a[:30].mean(), out[:, 1:] * b[:30].std() + b[:30].mean()], 1
    )
    assert pred.shape == (10, 3, 8, 8)
    np.testing.assert_allclose(pred, want, rtol=1e-4, atol=1e-3)
    assert abs(pred[:, 0].mean() - 300) < 5  # kelvin, not the normalised units the model works in


@pytest.mark.mpi
def test_three_ranks_write_the_same_predictions_in_the_same_order(run):
    predict(run / "run", "all", out=run / "one.npy", progress=False)
    proc = run_ranks(3, ["-m", "caldera.cli", "predict", str(run / "run"), "--split", "all", "--batch-size", "3",
                         "--out", str(run / "three.h5")])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(run / "three.h5") as f:
        three, attrs = f["prediction"][:], dict(f.attrs)
    np.testing.assert_allclose(three, np.load(run / "one.npy"), rtol=1e-5, atol=1e-4)
    assert attrs["split"] == "all" and attrs["samples"] == N
    assert json.loads((run / "one.json").read_text())["all_loss"] == pytest.approx(
        attrs["all_loss"], rel=1e-5
    )
    assert proc.stdout.count("all_loss") == 1  # rank 0 alone prints
    assert not list(run.glob(".*partial"))  # the files appeared whole under their names


def test_a_file_without_targets_is_predicted_and_mistakes_are_named(run, capsys):
    scores = predict(
        run / "run", "all", ["data.args.targets=[]"], out=run / "x.npy", score=False, progress=False
    )
    assert scores == {"samples": N} and np.load(run / "x.npy").shape == (N, 3, 8, 8)
    with pytest.raises(ConfigError, match="has no config.resolved.json or model.pt"):
        predict(run / "nowhere")
    with pytest.raises(ConfigError, match=r"write \.npy, \.h5 or \.nc"):
        predict(run / "run", out=run / "p.csv")
    assert main(["predict", str(run / "run"), "--set", "data.args.inputs=['nope']"]) == 2
    assert "nope" in capsys.readouterr().err
    # A model the run's model.pt does not fit: one line naming what differs, not torch's traceback.
    assert main(["predict", str(run / "run"), "--set", "model.args.channels=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.pt does not fit this model: missing [], unexpected []" in err


def test_netcdf_output_has_one_variable_per_target(run):
    predict(run / "run", "val", out=run / "val.nc", progress=False)
    netCDF4 = pytest.importorskip("netCDF4")
    with netCDF4.Dataset(run / "val.nc") as nc:  # from HDF5 input: generic dimension names, no coordinates
        assert nc["a"].dimensions == ("sample", "y", "x") and nc["b"].dimensions == (
            "sample",
            "b_channel",
            "y",
            "x",
        )
        a, b, record = nc["a"][:], nc["b"][:], nc["record"][:]
    pred = predict(run / "run", "val", out=run / "val2.npy", progress=False) and np.load(run / "val2.npy")
    np.testing.assert_array_equal(a, pred[:, 0])
    np.testing.assert_array_equal(b, pred[:, 1:])
    np.testing.assert_array_equal(record, np.arange(30, 40))  # the validation records of the file


def test_netcdf_input_gives_a_cf_style_forecast_file(tmp_path):
    """From a NetCDF input: the output keeps its time axis, grid coordinates and units (xarray-ready)."""
    netCDF4 = pytest.importorskip("netCDF4")
    rng = np.random.default_rng(1)
    n, lat, lon = 24, np.linspace(-70, 70, 8), np.arange(8) * 45.0
    with netCDF4.Dataset(tmp_path / "in.nc", "w") as nc:
        for name, size in (("time", None), ("lat", 8), ("lon", 8)):
            nc.createDimension(name, size)
        nc.createVariable("time", "f8", ("time",))[:] = np.arange(n) * 0.25
        nc["time"].units, nc["time"].calendar = "days since 2000-01-01", "noleap"
        for name, values in (("lat", lat), ("lon", lon)):
            nc.createVariable(name, "f8", (name,))[:] = values
        T = 280 + np.cumsum(rng.normal(size=(n, 8, 8)), axis=0)
        nc.createVariable("T", "f4", ("time", "lat", "lon"))[:] = T
        nc["T"].units = "K"
    cfg = load_config({
        "run": {"dir": str(tmp_path / "run")},
        "model": {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1, "channels": 4}},
        "data": {"source": "scientific", "batch_size": 4, "val_fraction": 0.25,
                 "args": {"path": str(tmp_path / "in.nc"), "inputs": ["T"], "targets": ["T"], "window": 2, "lead": 1}},
        "optim": {"epochs": 1}, "train": {"progress": False, "plot": False},
    })  # fmt: skip
    train(cfg)
    main(["predict", str(tmp_path / "run"), "--split", "all", "--out", str(tmp_path / "out.nc")])
    main(["predict", str(tmp_path / "run"), "--split", "all", "--out", str(tmp_path / "out.npy")])
    with netCDF4.Dataset(tmp_path / "out.nc") as out:
        assert out["T"].dimensions == ("time", "lat", "lon") and out["T"].units == "K"
        np.testing.assert_array_equal(out["lat"][:], lat)
        # The targets' records: t + 1 after each window, in the training records then the validation ones (the
        # first two validation records only feed the first validation window).
        records = np.r_[2:18, 20:24]
        np.testing.assert_array_equal(out["record"][:], records)
        np.testing.assert_array_equal(out["time"][:], records * 0.25)
        assert out["time"].calendar == "noleap"
        np.testing.assert_array_equal(out["T"][:], np.load(tmp_path / "out.npy")[:, 0])
        assert abs(float(out["T"][:].mean()) - T[records].mean()) < 0.1 * T.std()  # kelvin, like the input


def test_a_new_file_is_normalised_with_the_runs_statistics_which_stay_as_they_were(run):
    """Predicting on another file uses the training statistics (the model's units), and never rewrites them."""
    saved = (run / "run" / "normalization.json").read_bytes()
    with h5py.File(run / "fields.h5") as f:
        x, a, b = f["x"][:], f["a"][:], f["b"][:]
    with h5py.File(run / "shifted.h5", "w") as f:  # another period: other means, same variables
        f["x"], f["a"], f["b"] = x + 3.0, a + 50.0, b
    predict(
        run / "run", "all", [f"data.args.path={run / 'shifted.h5'}"], out=run / "shifted.npy", progress=False
    )
    assert (run / "run" / "normalization.json").read_bytes() == saved
    model = build_model(load_config(json.loads((run / "run" / "config.resolved.json").read_text())))
    model.load_state_dict(torch.load(run / "run" / "model.pt"))
    with torch.no_grad():  # the training records' statistics applied to the new inputs
        out = model(torch.from_numpy((x + 3.0 - x[:30].mean()) / x[:30].std())).numpy()
    want = np.concatenate(
        [out[:, :1] * a[:30].std() + a[:30].mean(), out[:, 1:] * b[:30].std() + b[:30].mean()], 1
    )
    np.testing.assert_allclose(np.load(run / "shifted.npy"), want, rtol=1e-4, atol=1e-3)
