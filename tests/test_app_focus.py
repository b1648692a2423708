"""Focus detection: the defocus point spread is a normalised disk, the classical measure falls with defocus on a
real photograph, and a short training from the run file estimates defocus better than the calibrated Laplacian."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from caldera.cli import main
from caldera.config import load_config
from caldera.sims.focus import Calibration, defocus, generate, gradient_energy, laplacian_variance, pillbox
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = ROOT / "examples" / "focus.toml"


def test_pillbox_is_a_normalised_disk_and_radius_zero_is_the_identity():
    for r in (0.0, 0.3, 1.0, 2.5, 6.0):
        k = pillbox(r)
        assert k.sum() == pytest.approx(1.0, abs=1e-12) and k.min() >= 0
        # Round: symmetric under the square's turns and mirrors.
        np.testing.assert_allclose(k, k.T, atol=1e-15)
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
        c = np.arange(-(len(k) // 2), len(k) // 2 + 1)
        dist = np.hypot(c[:, None], c[None, :])
        assert np.all(k[dist > r + 0.75] == 0)  # nothing outside the disk (a pixel's corner is 0.71 px away)
    k = pillbox(3.0)  # the area of the disk is pi r^2 pixels: inner pixels weigh 1 / (pi r^2)
    assert k[3, 3] == pytest.approx(1 / (np.pi * 9), rel=0.03)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 40, 50))
    np.testing.assert_array_equal(defocus(images, 0.0), images)
    np.testing.assert_allclose(defocus(np.full((1, 30, 30), 0.4), 4.0), 0.4, atol=1e-12)  # flat stays flat
    impulse = np.zeros((41, 41))
    impulse[20, 20] = 1.0
    # The blur of a point is the point spread itself, centred where the point was (no shift).
    np.testing.assert_allclose(defocus(impulse, 2.5)[17:24, 17:24], pillbox(2.5), atol=1e-12)
    assert defocus(impulse, 2.5).sum() == pytest.approx(1.0)
    # One radius per image equals blurring each alone.
    both = defocus(images[:2], np.array([1.0, 3.0]))
    np.testing.assert_allclose(both[1], defocus(images[1], 3.0), atol=1e-12)


def test_sharpness_falls_monotonically_with_defocus_on_a_real_photograph():
    data = pytest.importorskip("skimage.data", reason="pip install scikit-image (in the test extra)")
    photo = data.camera()[128:384, 128:384] / 255.0  # a real photograph, shipped inside the wheel
    # From 0 to 6 px; a disk of radius <= 0.5 px lies inside its own pixel, so it is the identity too.
    radii = np.array([0.0, *np.arange(1.0, 6.01, 0.5)])
    np.testing.assert_allclose(defocus(photo, 0.5), photo, atol=1e-12)
    stack = np.stack([defocus(photo, r) for r in radii])
    vol = laplacian_variance(stack)
    assert np.all(np.diff(vol) < 0), vol
    assert vol[0] / vol[-1] > 50  # not a marginal trend: the fine detail is mostly gone at 6 px
    energy = gradient_energy(stack)
    assert np.all(np.diff(energy, axis=0) < 0), energy  # at every scale
    # Coarser scales lose less to the same blur: their share of the energy grows with the radius.
    assert np.all(np.diff(energy[:, 2] / energy[:, 0]) > 0)


@pytest.fixture
def one_thread():
    """Train on one torch thread: pytest runs two test files at a time on two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_from_the_run_file_beats_the_calibrated_laplacian(tmp_path, one_thread, capsys):
    n, size = 1280, 32
    run = tmp_path / "run"
    code = main(["train", str(RUN_FILE), "--set", f"run.dir={run}", "--set", f"data.args.n={n}",
                 "--set", f"data.args.size={size}", "--set", "model.args.channels=8", "--set", "optim.epochs=4",
                 "--set", "optim.lr=0.01", "--set", "data.batch_size=32",
                 "--set", "train.progress=false", "--set", "train.plot=false"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    files = RunDir(run)
    cfg = load_config(files.read_config())
    model = load_run_model(files, cfg).eval()
    n_val = int(n * cfg.data.val_fraction)
    seed = cfg.data.args.get("seed", 0)  # the data source's seed (the same for every training seed)
    x_val, r_val = generate(n_val, size, seed=seed, start=n - n_val)
    x_train, r_train = generate(n - n_val, size, seed=seed)
    with torch.no_grad():
        cnn = model(torch.from_numpy(x_val[:, None]))[:, 0].numpy()
    cnn_mae = np.abs(cnn - r_val).mean()
    # The classical measure gets the whole training set to calibrate on, as the network did to train on.
    lap_mae = np.abs(Calibration.fit("laplacian", x_train, r_train).predict(x_val) - r_val).mean()
    chance = np.abs(np.median(r_train) - r_val).mean()  # always answering the median radius: about 1.5 px
    # Measured: CNN 1.04 px, Laplacian 1.60 px (worse than the median guess: its variance follows the shot noise
    # and the specimen's contrast more than the blur), median guess 1.43 px. 192 steps; the full run gets 0.66 px.
    assert cnn_mae < lap_mae and cnn_mae < 0.85 * chance, (cnn_mae, lap_mae, chance)
    # A patch too small for the blur is one line naming the limits, exit 2.
    code = main(["train", str(RUN_FILE), "--set", f"run.dir={tmp_path / 'bad'}", "--set", "data.args.size=8"])
    err = capsys.readouterr().err
    assert code == 2 and "size >= 16" in err and "Traceback" not in err, err


def test_eval_script_reports_the_cnn_over_seeds_and_the_classical_measures_once():
    spec = importlib.util.spec_from_file_location("focus_eval", ROOT / "examples" / "focus_eval.py")
    focus_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(focus_eval)
    real = {"truth": [0.0, 4.0, 0.0, 4.0], "image": ["a", "a", "b", "b"]}
    runs = [{"estimate": [0.0, 4.0, 1.0, 4.0], "mae_px": 0.25, "accuracy": 1.0, "images_per_s": 10.0},
            {"estimate": [1.0, 4.0, 3.0, 4.0], "mae_px": 1.0, "accuracy": 0.75, "images_per_s": 12.0}]  # fmt: skip
    assert focus_eval.per_image_mae(real, runs[1]["estimate"]) == {"a": 0.5, "b": 1.5}
    classical = {"estimate": [2.0, 2.0, 2.0, 2.0], "mae_px": 2.0, "accuracy": 0.5, "images_per_s": 500.0}
    real.update(cnn_runs=runs, laplacian=classical, gradient=classical)
    real["cnn"] = {k: focus_eval.spread([r[k] for r in runs]) for k in ("mae_px", "accuracy", "images_per_s")}
    per_image = [focus_eval.per_image_mae(real, r["estimate"]) for r in runs]
    real["per_image_mae"] = {"cnn": {n: focus_eval.spread([p[n] for p in per_image]) for n in ("a", "b")},
                             "laplacian": {"a": 2.0, "b": 2.0}, "gradient": {"a": 2.0, "b": 2.0}}  # fmt: skip
    synth = {
        "cnn": {k: real["cnn"][k] for k in ("mae_px", "accuracy")},
        "laplacian": classical,
        "gradient": classical,
    }
    text = focus_eval.table({"real": real, "synthetic_val": synth})
    # mean ± sample sd of 0.25 and 1.0 (sd 0.53), each seed's value, and the classical rows once, without a spread.
    assert "mean ± sd over 2 seeds | **0.62** ± 0.53 | **87.5%** ± 17.7% | 11.0 |" in text
    assert "| CNN (FocusNet), per seed | 0.25, 1.00 | 100.0%, 75.0% | 10.0, 12.0 |" in text
    assert "| variance of Laplacian (does not depend on the seed) | 2.00 | 50.0% | 500 |" in text
    assert "| b | 1.00 ± 0.71 | 2.00 | 2.00 |" in text  # per-image MAE 0.5 and 1.5
