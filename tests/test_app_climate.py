"""The climate application: the toy atmosphere obeys its physics, its NetCDF file round-trips, and a forecaster
trained on it for a few seconds beats persistence on held-out times."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from caldera.config import load_config
from caldera.data import open_reader
from caldera.errors import ConfigError
from caldera.sims import climate as c
from caldera.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _wind_corners(grid: c.Grid, seed: int = 0) -> np.ndarray:
    return c.Wind.random(np.random.default_rng(seed)).streamfunction(
        grid.lat_edges, grid.lon - grid.dlon / 2, 10.0
    )


def test_transport_conserves_tracer_mass_and_keeps_a_constant_constant():
    grid = c.Grid(16, 32)
    psi = _wind_corners(grid)
    T = np.random.default_rng(1).uniform(200, 300, (grid.nlat, grid.nlon))
    mass = (grid.area * T).sum()
    for kappa in (0.0, 5e4):
        after = c.transport(grid, T, psi, 2 * c.DAY, kappa)
        assert abs((grid.area * after).sum() / mass - 1) < 1e-12
        assert np.abs(after - T).max() > 1.0  # it did move
    # The discrete wind is exactly non-divergent: a uniform tracer stays uniform.
    flat = c.transport(grid, np.full_like(T, 250.0), psi, 2 * c.DAY, 5e4)
    np.testing.assert_allclose(flat, 250.0, rtol=1e-12)


def test_diffusion_matches_the_spherical_laplacian():
    grid = c.Grid(32, 64)
    lat, lon = np.meshgrid(grid.lat, grid.lon, indexing="ij")
    kappa, zero = 1e5, np.zeros((grid.nlat, grid.nlon))
    zero_y = np.zeros((grid.nlat + 1, grid.nlon))
    # Spherical harmonics: laplacian Y_l = -l (l + 1) / a^2 Y_l.
    for field, l in ((np.sin(lat), 1), (np.cos(lat) ** 2 * np.cos(2 * lon), 2)):
        got = c.tendency(grid, field, zero, zero_y, kappa)
        expected = -l * (l + 1) * kappa / c.RADIUS**2 * field
        assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


def test_advection_matches_solid_body_rotation():
    grid, speed = c.Grid(32, 64), 20.0
    lat_e = grid.lat_edges[:, None]
    psi = np.broadcast_to(
        -c.RADIUS * speed * np.sin(lat_e), (grid.nlat + 1, grid.nlon)
    ).copy()  # u = U cos(lat)
    fx, fy = c.face_fluxes(grid, psi)
    u, v = c.cell_wind(grid, fx, fy)
    lat, lon = np.meshgrid(grid.lat, grid.lon, indexing="ij")
    np.testing.assert_allclose(u, speed * np.cos(lat), atol=0.01 * speed)
    np.testing.assert_allclose(v, 0.0, atol=1e-9)
    T = np.cos(lat) * np.cos(lon)
    expected = speed / c.RADIUS * np.cos(lat) * np.sin(lon)  # -u / (a cos lat) dT/dlon
    err = c.tendency(grid, T, fx, fy, 0.0) - expected
    assert np.sqrt((err**2).mean() / (expected**2).mean()) < 0.1  # first-order upwind: O(dlon / 2)


def test_transport_and_model_are_periodic_in_longitude():
    grid = c.Grid(16, 32)
    psi = _wind_corners(grid, 3)
    T = np.random.default_rng(2).normal(size=(grid.nlat, grid.nlon))
    shifted = c.transport(grid, np.roll(T, 5, axis=1), np.roll(psi, 5, axis=1), c.DAY, 5e4)
    np.testing.assert_allclose(shifted, np.roll(c.transport(grid, T, psi, c.DAY, 5e4), 5, axis=1), atol=1e-12)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 32)
    for coords in (False, True):  # the latitude channels must not break the symmetry in longitude
        model = c.ClimateNet(8, 3, 8, window=2, coords=coords).eval()
        torch.nn.init.normal_(model.out.weight)  # leave persistence, or the test would be trivial
        with torch.no_grad():
            np.testing.assert_allclose(model(x.roll(8, -1)), model(x).roll(8, -1), atol=1e-5)
            assert not torch.allclose(model(x), model(x).roll(8, -1), atol=1e-3)


def test_insolation_has_the_right_global_and_daily_means():
    grid = c.Grid(32, 64)
    w = grid.area / grid.area.sum() / grid.nlon
    for t in (0.0, 30.3, 91.25, 200.7):
        assert abs((c.insolation(grid, t) * w).sum() / (c.SOLAR_CONSTANT / 4) - 1) < 0.01
        hourly = np.mean([c.insolation(grid, math.floor(t) + h / 96) for h in range(96)], axis=0)
        np.testing.assert_allclose(hourly.mean(axis=1), c.daily_mean_insolation(grid.lat, t)[:, 0], atol=3.0)
    solstice = c.daily_mean_insolation(grid.lat, c.YEAR / 4)[:, 0]  # northern summer
    assert solstice[0] == 0.0 and solstice[-1] > solstice[grid.nlat // 2]  # polar night; polar day > equator


def test_lat_weights_and_weighted_rmse():
    for nlat in (8, 32, 721):
        w = c.lat_weights(nlat)
        assert w.shape == (nlat,) and abs(w.sum() - nlat) < 1e-9
    grid = c.Grid(32, 64)
    area_share = (grid.area[:, 0] / grid.area.sum()) * grid.nlat
    np.testing.assert_allclose(c.lat_weights(32), area_share, rtol=2e-3)
    target = torch.zeros(2, 3, 32, 64)
    assert abs(float(c.lat_weighted_rmse(target + 0.7, target)) - 0.7) < 1e-6
    polar, tropical = target.clone(), target.clone()
    polar[..., 0, :] = tropical[..., 16, :] = 1.0
    assert float(c.lat_weighted_rmse(polar, target)) < 0.3 * float(c.lat_weighted_rmse(tropical, target))


def test_harmonic_climatology_recovers_a_seasonal_and_diurnal_signal():
    def signal(t: np.ndarray) -> np.ndarray:
        return 250 + 10 * np.cos(2 * np.pi * t / c.YEAR + 0.3) + 2 * np.sin(2 * np.pi * t)

    t = np.arange(0, 500, 0.25)
    noise = np.random.default_rng(0).normal(0, 1, (t.size, 2, 3))
    fit = c.harmonic_climatology(t, signal(t)[:, None, None] + noise, t + 0.1)
    np.testing.assert_allclose(fit, np.broadcast_to(signal(t + 0.1)[:, None, None], fit.shape), atol=0.3)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("climate") / "small.nc"
    fields = c.simulate(16, 32, days=150, spinup_days=20, seed=1)
    c.write_netcdf(
        path, fields, {"caldera_days": 150.0, "caldera_nlat": 16, "caldera_nlon": 32, "caldera_seed": 1}
    )
    return path, fields


@pytest.fixture()
def small_file(simulated) -> Path:
    return simulated[0]


def test_netcdf_file_round_trips_through_open_reader(simulated):
    small_file, fields = simulated
    reader = open_reader(small_file)
    assert sorted(reader.variables) == sorted([*c.STATE, *c.FORCING]) and len(reader) == 600
    got = reader.read(np.array([0, 7, 599]))
    for name in (*c.STATE, *c.FORCING):
        assert reader.shape(name) == (16, 32)
        np.testing.assert_array_equal(got[name], fields[name][[0, 7, 599]])
    import netCDF4

    with netCDF4.Dataset(small_file) as nc:
        assert nc["T"].units == "K" and nc["u"].standard_name == "eastward_wind"
        np.testing.assert_allclose(nc["lat"][:], np.degrees(c.Grid(16, 32).lat))
        np.testing.assert_allclose(nc["time"][:], fields["time"])


def test_a_file_made_with_other_settings_is_refused(small_file):
    with pytest.raises(ValueError, match="other settings.*seed: file 1, run file 2.*delete it"):
        c.dataset(str(small_file), days=150, nlat=16, nlon=32, seed=2)


def test_rollout_of_an_untrained_model_is_persistence(small_file, tmp_path):
    data = c.dataset(str(small_file), days=150, nlat=16, nlon=32, seed=1, run_dir=tmp_path)
    stats = data["train"].stats
    skill = c.rollout_skill(c.ClimateNet(8, 3, 8), small_file, stats, max_lead=8, every=8)
    np.testing.assert_allclose(skill["model"], skill["persistence"], rtol=1e-5)
    np.testing.assert_allclose(skill["model_acc"], skill["persistence_acc"], atol=1e-5)
    assert np.all(skill["persistence_acc"][0] > 0.9) and np.all(skill["climatology_acc"] == 0)
    assert np.all(np.diff(skill["persistence"][:, 0]) > -0.05)  # persistence degrades with lead
    # Persistence is better than climatology at 6 h, the reason forecasters start from the current state.
    assert np.all(skill["persistence"][0] < skill["climatology"][0])


def test_short_training_beats_persistence_on_held_out_times(small_file, tmp_path):
    data = c.dataset(str(small_file), days=150, nlat=16, nlon=32, seed=1, run_dir=tmp_path)
    val = data["val"]
    x, y = (torch.as_tensor(a) for a in val.read_batch(np.arange(len(val))))
    persistence = ((x[:, [1, 3, 5]] - y) ** 2).mean(dim=(0, 2, 3))  # the newest input record of T, u, v
    torch.manual_seed(0)
    model = c.ClimateNet(8, 3, 8)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-2), torch.nn.MSELoss(), max_epochs=10,
                      batch_size=32, progress=False, plot=False)  # fmt: skip
    trainer.fit(data["train"])  # 150 steps, about 6 s
    with torch.no_grad():
        mse = ((model(x) - y) ** 2).mean(dim=(0, 2, 3))
    # Measured 0.34, 0.44, 0.26 x persistence's MSE for T, u, v; 0.6 leaves room for other
    # CPUs and torch builds, and still needs every variable to be learned.
    assert torch.all(mse < 0.6 * persistence), (mse, persistence)


def test_run_file_passes_check(capsys):
    from caldera.cli import main

    run_file = ROOT / "examples" / "climate_forecast.toml"
    assert main(["check", str(run_file)]) == 0
    cfg = load_config(run_file)
    assert cfg.data.source == "climate"
    assert (
        cfg.model.args["window"] == cfg.data.args["window"]
        and '"climate-forecast"' in capsys.readouterr().out
    )
    with pytest.raises(ValueError, match="inputs must start"):
        c.ClimateNet(4, 3, 8, window=2)


def test_rollout_samples_line_up_and_the_model_rolls_itself_out(small_file, tmp_path):
    args = dict(days=150, nlat=16, nlon=32, seed=1, run_dir=tmp_path)
    one, four = (
        c.dataset(str(small_file), **args)["train"],
        c.dataset(str(small_file), **args, rollout=4)["train"],
    )
    assert len(four) == len(one) - 3  # the 4th target must lie inside the training records
    x1, y1 = one.read_batch(np.arange(8))
    x4, y4 = four.read_batch(np.arange(5))
    assert x4.shape[1] == 8 + 3 and y4.shape[1] == 3 * 4
    for j in range(4):  # step j's target of sample i is the one-step target of sample i + j
        np.testing.assert_array_equal(y4[:, 3 * j : 3 * j + 3], y1[j : j + 5])
    for j in range(3):  # and the forcing fed at step j + 1 is the insolation of that time
        np.testing.assert_array_equal(x4[:, 8 + j], x1[j + 1 : j + 6, 7])
    torch.manual_seed(0)
    model = c.ClimateNet(8, 3, 8).eval()
    torch.nn.init.normal_(model.out.weight, std=0.1)  # not persistence, or feeding back would be trivial
    with torch.no_grad():
        rolled = model(torch.as_tensor(x4))
        window, by_hand = torch.as_tensor(x4[:, :8]), []
        for s in range(4):  # the window layout: [T(t-1), T(t), u(t-1), u(t), v(t-1), v(t), ins(t-1), ins(t)]
            by_hand.append(model(window))
            p, ins = by_hand[-1], torch.as_tensor(x4[:, 8 + s]) if s < 3 else None
            if ins is not None:
                window = torch.stack([window[:, 1], p[:, 0], window[:, 3], p[:, 1], window[:, 5], p[:, 2],
                                      window[:, 7], ins], 1)  # fmt: skip
    torch.testing.assert_close(rolled, torch.cat(by_hand, 1), rtol=0, atol=0)
    every2 = c.dataset(str(small_file), **args, rollout=4, rollout_every=2)["train"]  # every 2nd start only
    assert len(every2) == (len(four) + 1) // 2
    np.testing.assert_array_equal(every2.read_batch(np.arange(3))[1], four.read_batch(np.array([0, 2, 4]))[1])
    with pytest.raises(ValueError, match="rollout counts 6-hour steps"):
        c.dataset(str(small_file), **args, rollout=3, lead=2)


def test_anomaly_correlation_damping_and_scores_over_seeds():
    rng = np.random.default_rng(0)
    clim = rng.normal(250, 10, (6, 3, 3, 8, 16))  # (starts, lead, variable, lat, lon)
    anomaly = rng.normal(0, 2, clim.shape)
    truth = clim + anomaly
    np.testing.assert_allclose(c.acc_by_lead(truth, truth, clim), 1.0, atol=1e-12)  # a perfect forecast
    np.testing.assert_array_equal(c.acc_by_lead(clim, truth, clim), 0.0)  # climatology: no anomaly, no skill
    np.testing.assert_allclose(c.acc_by_lead(clim - 3 * anomaly, truth, clim), -1.0, atol=1e-12)
    # Activity: the truth's own is 1, climatology's 0, three times the anomaly's 3.
    np.testing.assert_allclose(c.activity_by_lead(truth, truth, clim), 1.0, atol=1e-12)
    np.testing.assert_allclose(c.activity_by_lead(clim - 3 * anomaly, truth, clim), 3.0, atol=1e-12)
    np.testing.assert_array_equal(c.activity_by_lead(clim, truth, clim), 0.0)
    # An independent anomaly correlates ~0; half signal, half independent noise of equal size: 1/sqrt(2).
    noise = rng.normal(0, 2, clim.shape)
    assert np.abs(c.acc_by_lead(clim + noise, truth, clim)).max() < 0.15
    np.testing.assert_allclose(c.acc_by_lead(clim + anomaly + noise, truth, clim), 2**-0.5, atol=0.06)
    # Damping: a forecast with twice the true anomaly is best shrunk by 1/2, which recovers the truth.
    skill = {"forecast": clim + 2 * anomaly, "truth": truth, "clim": clim}
    factor = c.fit_damping(skill)
    np.testing.assert_allclose(factor, 0.5, atol=1e-12)
    np.testing.assert_allclose(c.damped(skill, factor), truth, atol=1e-9)
    # Over seeds: mean and sd per lead, and the lead up to which the mean (and mean + sd) beats a baseline.
    lead = np.array([6.0, 12.0, 18.0, 24.0])
    base = {"lead_hours": lead, "variables": ["T"], "starts": np.arange(5), "persistence": np.full((4, 1), 2.0),
            "climatology": np.full((4, 1), 3.0), "persistence_acc": np.full((4, 1), 0.5),
            "climatology_acc": np.zeros((4, 1))}  # fmt: skip
    runs = [{**base, "model": np.array([[1.0], [2.5], [2.9], [3.5]]), "model_acc": np.array([[0.9], [0.7], [0.6], [0.3]])},
            {**base, "model": np.array([[1.2], [2.7], [3.3], [3.5]]), "model_acc": np.array([[0.9], [0.7], [0.5], [0.3]])}]  # fmt: skip
    agg = c.skill_over_runs(runs)
    np.testing.assert_allclose(agg["model"][:, 0], [1.1, 2.6, 3.1, 3.5])
    np.testing.assert_allclose(agg["model_sd"][:, 0], [0.02**0.5, 0.02**0.5, 0.08**0.5, 0.0], atol=1e-12)
    row = agg["crossings"]["T"]
    assert row["model_beats_persistence_until_h"] == 6.0 and row["model_beats_climatology_until_h"] == 12.0
    assert row["model_beats_climatology_until_h_each_run"] == [18.0, 12.0]
    assert row["model_acc_useful_until_h"] == 12.0 and row["persistence_acc_useful_until_h"] is None


def test_weighted_loss_counts_each_variable_by_its_weight_in_every_rollout_step(simulated):
    small_file, fields = simulated
    target = torch.randn(4, 6, 8, 16)  # two steps of (T, u, v)
    pred = target.clone()
    pred[:, 3] += 1.0  # T of the second step off by 1 everywhere
    pred[:, 5] += 2.0  # v of the second step off by 2
    lat_w = torch.as_tensor(c.lat_weights(8)).mean()  # the weights have mean 1
    assert c.weighted_mse(pred, target).item() == pytest.approx((1 + 4) / 6 * lat_w.item())
    assert c.weighted_mse(pred, target, [3.0, 1.0, 0.0]).item() == pytest.approx(3 / 6)
    for wrong in ([1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0], []):
        with pytest.raises(ConfigError, match="give one weight >= 0 per predicted variable"):
            c.weighted_mse(pred, target, wrong)
    stats = {v: type("S", (), {"std": float(fields[v].std())}) for v in c.STATE}
    weights = c.increment_weights(small_file, stats)
    # Against its range, T changes least in 6 h: it gets the largest weight; the weights have mean 1.
    assert np.mean(weights) == pytest.approx(1, abs=1e-3) and weights[0] == max(weights)


def test_perfect_model_forecasts_start_from_the_true_state_and_fan_out():
    fields = c.simulate(8, 16, days=40, seed=3)
    truth = np.stack([fields[v] for v in c.STATE], axis=1)
    starts = np.arange(20, 120, 10)
    runs = c.perfect_model_forecasts(starts, 24, 4, nlat=8, nlon=16, days=40, seed=3)
    assert runs.shape == (4, len(starts), 24, 3, 8, 16)

    def rmse(a: np.ndarray, lead: int) -> float:
        return float(np.sqrt(((a - truth[starts + lead]) ** 2).mean()))

    persistence = truth[starts]
    # 6 h on: only 6 h of unknown noise, far closer than persistence; 6 days on: the members have fanned out,
    # and their mean is closer to the truth than any one of them.
    assert rmse(runs[0, :, 0], 1) < 0.5 * rmse(persistence, 1)
    assert np.abs(runs[0, :, -1] - runs[1, :, -1]).max() > 1.0
    assert rmse(runs[:, :, -1].mean(0), 24) < min(rmse(r[:, -1], 24) for r in runs)
