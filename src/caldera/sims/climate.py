"""A toy atmosphere on a latitude-longitude grid, written to NetCDF, for training a data-driven weather forecaster.

The state is a temperature-like tracer ``T`` and the wind ``(u, v)``. The wind comes from a stream function:
two zonal jets whose strength and latitude follow the seasons, plus planetary waves (zonal wavenumbers 3-5 in
each hemisphere) that drift eastward while their amplitudes and phases wander randomly (Ornstein-Uhlenbeck
amplitudes, random-walk phases). That randomness gives the flow a finite predictability, as in real weather.
``T`` is advected by that wind (conservative upwind finite volumes on the sphere: the discrete wind is exactly
non-divergent and tracer mass is conserved to round-off), diffused, and relaxed towards a radiative-equilibrium
temperature set by the top-of-atmosphere insolation, with its seasonal and diurnal cycles.

A forecaster (FourCastNet/GraphCast style) learns (state, insolation) at t - 6 h and t -> state(t + 6 h) and is
rolled out autoregressively; skill is the latitude-weighted RMSE against persistence and climatology at each lead time.
``dataset`` writes the NetCDF file once and serves it through ``caldera.data.scientific``; the model is the
built-in ``climate_net`` (``caldera.models.climate.ClimateNet``, a U-Net periodic in longitude);
``lat_weighted_rmse`` is the metric; ``rollout_skill`` scores a trained model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from caldera.comm.base import Communicator
from caldera.data.formats import require
from caldera.data.scientific import BatchReads
from caldera.errors import ConfigError
from caldera.log import get_logger
from caldera.models.climate import ClimateNet as ClimateNet
from caldera.sims import write_once  # re-exported: the model of this application

_log = get_logger(__name__)

RADIUS = 6.371e6  # m
DAY = 86400.0  # s
YEAR = 365.0  # days
SOLAR_CONSTANT = 1361.0  # W m-2
OBLIQUITY = math.radians(23.44)
# The simulation's physics, as the training files are made (``dataset`` passes only days, grid and seed), so that
# ``perfect_model_forecasts`` runs the same atmosphere the file holds.
SPINUP_DAYS, KAPPA, RELAX_DAYS = 60.0, 5e4, 12.0  # days; diffusivity in m^2/s; relaxation time in days
USEFUL_ACC = 0.6  # the anomaly correlation above which forecast centres call a forecast useful
STATE = ("T", "u", "v")  # predicted variables, in channel order
FORCING = ("insolation",)  # known in advance at every time (computed from the calendar, as GraphCast does)


# -- grid ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A regular lat-lon grid of cell centres; latitude runs south to north, longitude is periodic."""

    nlat: int
    nlon: int

    def __post_init__(self) -> None:
        if self.nlat < 4 or self.nlon < 4:
            raise ValueError(f"grid {self.nlat}x{self.nlon} is too small: use at least 4 x 4 (e.g. 32 x 64)")

    @property
    def dlat(self) -> float:
        return math.pi / self.nlat

    @property
    def dlon(self) -> float:
        return 2 * math.pi / self.nlon

    @property
    def lat(self) -> np.ndarray:
        """Cell-centre latitudes in radians, (nlat,)."""
        return -math.pi / 2 + (np.arange(self.nlat) + 0.5) * self.dlat

    @property
    def lon(self) -> np.ndarray:
        """Cell-centre longitudes in radians, (nlon,)."""
        return np.arange(self.nlon) * self.dlon

    @property
    def lat_edges(self) -> np.ndarray:
        """Latitudes of the cell boundaries, (nlat + 1,), exactly +-pi/2 at the ends."""
        return np.linspace(-math.pi / 2, math.pi / 2, self.nlat + 1)

    @property
    def area(self) -> np.ndarray:
        """Cell areas in m^2, (nlat, 1): exact spherical zones."""
        return (RADIUS**2 * self.dlon * np.diff(np.sin(self.lat_edges)))[:, None]


def lat_weights(nlat: int) -> np.ndarray:
    """Latitude weights cos(lat) of a regular cell-centred grid, normalised to mean 1 (WeatherBench convention)."""
    w = np.cos(-np.pi / 2 + (np.arange(nlat) + 0.5) * np.pi / nlat)
    return w / w.mean()


# -- forcing: insolation ------------------------------------------------------------------------------------------


def _declination(t_days: float) -> float:
    return OBLIQUITY * math.sin(2 * math.pi * t_days / YEAR)


def insolation(grid: Grid, t_days: float) -> np.ndarray:
    """Top-of-atmosphere insolation (W m-2) at time ``t_days`` (day 0 = 00 UTC, northern spring equinox)."""
    decl = _declination(t_days)
    hour_angle = grid.lon[None, :] + 2 * math.pi * (t_days % 1.0) - math.pi  # local noon at 12 h local time
    lat = grid.lat[:, None]
    cos_zenith = np.sin(lat) * math.sin(decl) + np.cos(lat) * math.cos(decl) * np.cos(hour_angle)
    return SOLAR_CONSTANT * np.clip(cos_zenith, 0.0, None)


def daily_mean_insolation(lat: np.ndarray, t_days: float) -> np.ndarray:
    """Insolation averaged over a day (W m-2), in closed form from the sunset hour angle; (len(lat), 1)."""
    decl = _declination(t_days)
    lat = lat[:, None]
    sunset = np.arccos(np.clip(-np.tan(lat) * math.tan(decl), -1.0, 1.0))  # 0: polar night, pi: polar day
    return (
        SOLAR_CONSTANT
        / math.pi
        * (sunset * np.sin(lat) * math.sin(decl) + np.cos(lat) * math.cos(decl) * np.sin(sunset))
    )


def equilibrium_temperature(grid: Grid, t_days: float) -> np.ndarray:
    """Radiative-equilibrium temperature (K) the tracer relaxes to.

    Absorbed sunlight with an albedo that rises poleward (ice); the day-night swing is damped to 30 % of the
    insolation's because a real column's heat capacity smooths it."""
    daily = daily_mean_insolation(grid.lat, t_days)
    solar = daily + 0.3 * (insolation(grid, t_days) - daily)
    albedo = 0.3 + 0.4 * np.sin(grid.lat[:, None]) ** 2
    return 190.0 + 0.3 * (1 - albedo) * solar


# -- wind: jets and drifting, randomly wandering planetary waves --------------------------------------------------


@dataclass
class Wind:
    """A stochastic large-scale flow given by its stream function; ``step`` advances its random parts.

    Each wave's amplitude anomaly and phase-speed anomaly are driven by Ornstein-Uhlenbeck *rates*, so the flow
    changes smoothly: nearly predictable over hours (from two consecutive states), unpredictable after days."""

    anomaly: np.ndarray  # (waves,) amplitude anomaly, m/s
    rate: np.ndarray  # (waves,) its rate of change, m/s per day (OU)
    phase: np.ndarray  # (waves,) rad
    speed: np.ndarray  # (waves,) phase-speed anomaly, rad/day (OU)
    wavenumber: np.ndarray  # (waves,)
    hemisphere: np.ndarray  # (waves,) +1 north, -1 south
    mean_amplitude: float = 7.0  # m/s
    rate_std: float = 2.0  # m/s per day
    rate_days: float = 2.0  # correlation time of the rate
    anomaly_days: float = 4.0  # damping of the amplitude anomaly
    speed_std: float = 0.3  # rad/day
    speed_days: float = 3.0

    @classmethod
    def random(cls, rng: np.random.Generator, wavenumbers: tuple[int, ...] = (3, 4, 5)) -> Wind:
        """Three waves per hemisphere with random initial amplitudes and phases."""
        m = np.array(wavenumbers * 2, dtype=float)
        hemi = np.repeat([1.0, -1.0], len(wavenumbers))
        zero = np.zeros(m.size)
        return cls(4.0 * rng.standard_normal(m.size), zero, rng.uniform(0, 2 * np.pi, m.size), zero, m, hemi)

    @property
    def amplitude(self) -> np.ndarray:
        """Wave amplitudes in m/s."""
        return self.mean_amplitude + self.anomaly

    def phase_speed(self) -> np.ndarray:
        """Mean eastward drift in rad/day: long waves drift slower (Rossby-wave-like dispersion)."""
        c = 12.0 - 60.0 / self.wavenumber**2  # m/s at 45 degrees
        return c * DAY / (RADIUS * math.cos(math.pi / 4))

    def step(self, rng: np.random.Generator, dt_days: float) -> None:
        """Advance the random rates (exact OU updates), then amplitudes and phases, by ``dt_days``."""
        self.rate = _ou(rng, self.rate, self.rate_std, self.rate_days, dt_days)
        self.speed = _ou(rng, self.speed, self.speed_std, self.speed_days, dt_days)
        self.anomaly = self.anomaly * math.exp(-dt_days / self.anomaly_days) + self.rate * dt_days
        self.phase = self.phase + (self.phase_speed() + self.speed) * dt_days

    def streamfunction(self, lat: np.ndarray, lon: np.ndarray, t_days: float) -> np.ndarray:
        """Stream function (m^2/s) at latitudes ``lat`` x longitudes ``lon`` (radians); u = -dpsi/(a dlat)."""
        from scipy.special import erf

        lat = lat[:, None]
        season = math.cos(2 * math.pi * (t_days - YEAR / 4) / YEAR)  # +1 at northern summer solstice
        width = math.radians(10.0)
        psi = np.zeros((lat.shape[0], lon.size))
        # Jets: u = U exp(-((lat - lat_j) / width)^2), stronger and closer to the equator in winter.
        for hemi in (1.0, -1.0):
            winter = -hemi * season
            speed = 28.0 + 10.0 * winter
            centre = hemi * math.radians(45.0 - 6.0 * winter)
            psi = psi - RADIUS * speed * width * math.sqrt(math.pi) / 2 * erf((lat - centre) / width)
        # Waves: psi ~ a A w E(lat) cos(m lon - phase), so their wind is about A; cos(lat) keeps the poles calm.
        w = math.radians(15.0)
        for amp, phase, m, hemi in zip(self.amplitude, self.phase, self.wavenumber, self.hemisphere):
            envelope = np.exp(-(((lat - hemi * math.pi / 4) / w) ** 2)) * np.cos(lat)
            psi = psi + RADIUS * amp * w * envelope * np.cos(m * lon[None, :] - phase)
        return psi


def _ou(rng: np.random.Generator, x: np.ndarray, std: float, days: float, dt_days: float) -> np.ndarray:
    """Exact update of an Ornstein-Uhlenbeck process with stationary ``std`` and correlation time ``days``."""
    decay = math.exp(-dt_days / days)
    return x * decay + std * math.sqrt(1 - decay**2) * rng.standard_normal(x.size)


# -- transport: conservative finite volumes on the sphere ---------------------------------------------------------


def face_fluxes(grid: Grid, psi_corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Volume fluxes (m^2/s) through cell faces from the stream function at cell corners (nlat+1, nlon).

    Returns ``fx`` (nlat, nlon), eastward through each cell's west face, and ``fy`` (nlat+1, nlon), northward
    through each row's south face (zero at the poles). Differences of one corner function: every cell's net
    outflow is exactly zero, so the discrete wind is non-divergent and a constant tracer stays constant.
    """
    fx = -(psi_corners[1:] - psi_corners[:-1])
    fy = np.roll(psi_corners, -1, axis=1) - psi_corners
    fy[0] = fy[-1] = 0.0
    return fx, fy


def cell_wind(grid: Grid, fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre wind (u, v) in m/s, averaged from the face fluxes that move the tracer."""
    u_face = fx / (RADIUS * grid.dlat)
    coslat = np.cos(grid.lat_edges)[:, None]
    # At the poles the face has no length; its (zero) flux says nothing about v, so use the one interior face.
    v_face = np.divide(fy, RADIUS * coslat * grid.dlon, out=np.zeros_like(fy), where=coslat > 1e-12)
    u = 0.5 * (u_face + np.roll(u_face, -1, axis=1))
    v = 0.5 * (v_face[1:] + v_face[:-1])
    v[0], v[-1] = v_face[1], v_face[-2]
    return u, v


def _diffusive_conductance(grid: Grid, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """kappa x face length / centre distance, for zonal (nlat, 1) and meridional (nlat+1, 1) faces."""
    gx = kappa * grid.dlat / (np.cos(grid.lat)[:, None] * grid.dlon)
    gy = kappa * np.cos(grid.lat_edges)[:, None] * grid.dlon / grid.dlat
    gy[0] = gy[-1] = 0.0
    return gx, gy


def tendency(grid: Grid, T: np.ndarray, fx: np.ndarray, fy: np.ndarray, kappa: float) -> np.ndarray:
    """dT/dt (per second) from upwind advection by the face fluxes plus diffusion, in flux form."""
    west = np.roll(T, 1, axis=-1)
    qx = fx * np.where(fx > 0, west, T)  # tracer flux into each cell through its west face
    qy = np.zeros(T.shape[:-2] + fy.shape)
    qy[..., 1:-1, :] = fy[1:-1] * np.where(fy[1:-1] > 0, T[..., :-1, :], T[..., 1:, :])
    if kappa > 0:
        gx, gy = _diffusive_conductance(grid, kappa)
        qx = qx - gx * (T - west)
        qy[..., 1:-1, :] -= gy[1:-1] * (T[..., 1:, :] - T[..., :-1, :])
    net_in = qx - np.roll(qx, -1, axis=-1) + qy[..., :-1, :] - qy[..., 1:, :]
    return net_in / grid.area


def stable_substeps(grid: Grid, fx: np.ndarray, fy: np.ndarray, kappa: float, dt: float) -> int:
    """Smallest number of forward-Euler substeps of ``dt`` seconds that keeps the upwind scheme monotone."""
    out = np.maximum(-fx, 0) + np.maximum(np.roll(fx, -1, axis=1), 0) + np.maximum(fy[1:], 0)
    out = out + np.maximum(-fy[:-1], 0)
    if kappa > 0:
        gx, gy = _diffusive_conductance(grid, kappa)
        out = out + 2 * gx + gy[1:] + gy[:-1]
    rate = float((out / grid.area).max())
    return max(1, math.ceil(dt * rate / 0.9))


def transport(
    grid: Grid, T: np.ndarray, psi_corners: np.ndarray, dt: float, kappa: float = 0.0
) -> np.ndarray:
    """Advect and diffuse ``T`` for ``dt`` seconds in the wind of ``psi_corners``, with CFL-safe substeps."""
    fx, fy = face_fluxes(grid, psi_corners)
    n = stable_substeps(grid, fx, fy, kappa, dt)
    for _ in range(n):
        T = T + (dt / n) * tendency(grid, T, fx, fy, kappa)
    return T


# -- the whole simulation -----------------------------------------------------------------------------------------


def simulate(
    nlat: int = 32,
    nlon: int = 64,
    days: float = 730.0,
    dt_hours: float = 6.0,
    seed: int = 0,
    spinup_days: float = SPINUP_DAYS,
    kappa: float = KAPPA,
    relax_days: float = RELAX_DAYS,
) -> dict[str, np.ndarray]:
    """Run the toy atmosphere; return ``time`` (days) and ``T`` (K), ``u``, ``v`` (m/s), ``insolation``
    (W m-2), each (time, nlat, nlon) in float32, sampled every ``dt_hours`` after a spin-up."""
    grid = Grid(nlat, nlon)
    n_out = round(days / (dt_hours / 24.0))
    out = {k: np.empty((n_out, nlat, nlon), np.float32) for k in (*STATE, *FORCING)}
    for i, atmosphere in enumerate(_records(grid, days, dt_hours, seed, spinup_days, kappa, relax_days)):
        out["T"][i], out["u"][i], out["v"][i] = atmosphere.state()
        out["insolation"][i] = insolation(grid, atmosphere.t)
    out["time"] = np.arange(n_out) * (dt_hours / 24.0)
    return out


@dataclass
class Atmosphere:
    """The whole state of the toy atmosphere at time ``t`` (days): the tracer and the wind's hidden parameters
    (amplitude and phase-speed rates) that the file's u and v only show indirectly."""

    grid: Grid
    T: np.ndarray
    wind: Wind
    t: float
    kappa: float
    relax_days: float

    def psi(self) -> np.ndarray:
        """The stream function at the cell corners now."""
        return self.wind.streamfunction(self.grid.lat_edges, self.grid.lon - self.grid.dlon / 2, self.t)

    def state(self) -> np.ndarray:
        """(T, u, v) now, (3, nlat, nlon), as the file stores them."""
        u, v = cell_wind(self.grid, *face_fluxes(self.grid, self.psi()))
        return np.stack([self.T, u, v])

    def advance(self, rng: np.random.Generator, dt_days: float) -> None:
        """Advance by ``dt_days``: transport and relaxation in the current wind, then the wind's random step."""
        self.T = _advance(self.grid, self.T, self.psi(), self.t, dt_days, self.kappa, self.relax_days)
        self.wind.step(rng, dt_days)
        self.t += dt_days

    def copy(self) -> Atmosphere:
        """An independent copy (to branch forecasts from)."""
        wind = Wind(**{k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in vars(self.wind).items()})
        return Atmosphere(self.grid, self.T.copy(), wind, self.t, self.kappa, self.relax_days)


def _records(grid: Grid, days: float, dt_hours: float, seed: int, spinup_days: float, kappa: float,
             relax_days: float) -> Iterator[Atmosphere]:  # fmt: skip
    """The atmosphere at each output record after the spin-up (the same object, advanced between records)."""
    if days <= 0 or dt_hours <= 0 or spinup_days < 0:
        raise ValueError(f"days={days}, dt_hours={dt_hours}, spinup_days={spinup_days}: use positive values")
    rng = np.random.default_rng(seed)
    wind = Wind.random(rng)
    dt_days = dt_hours / 24.0
    n_spin, n_out = round(spinup_days / dt_days), round(days / dt_days)
    t = -n_spin * dt_days
    # Start from the daily-mean equilibrium: the spin-up removes what remains of the start.
    T = np.mean([equilibrium_temperature(grid, t + h / 24) for h in range(24)], axis=0)
    atmosphere = Atmosphere(grid, T, wind, t, kappa, relax_days)
    for k in range(n_spin + n_out):
        if k >= n_spin:
            yield atmosphere
        atmosphere.advance(rng, dt_days)


def perfect_model_forecasts(
    starts: np.ndarray,
    steps: int,
    members: int,
    nlat: int = 32,
    nlon: int = 64,
    days: float = 730.0,
    seed: int = 0,
    dt_hours: float = 6.0,
) -> np.ndarray:
    """Forecasts by the simulator itself from the exact state at records ``starts`` of ``simulate``'s run with
    these settings, each member with its own future noise: (members, starts, steps, 3, nlat, nlon) of T, u, v.

    The best any forecast can do: it knows even the wind's hidden rates, and only the noise to come is unknown.
    One member is a perfect sharp (deterministic) forecast; the members' mean approaches the best RMSE forecast
    (the expected future) as ``members`` grows."""
    grid, wanted = Grid(nlat, nlon), {int(s): j for j, s in enumerate(starts)}
    last = max(wanted)
    out = np.empty((members, len(starts), steps, len(STATE), nlat, nlon), np.float32)
    for i, atmosphere in enumerate(_records(grid, days, dt_hours, seed, SPINUP_DAYS, KAPPA, RELAX_DAYS)):
        if i > last:
            break  # the rest of the run holds no start
        if i not in wanted:
            continue
        for m in range(members):
            branch, rng = atmosphere.copy(), np.random.default_rng([seed, i, m, 1])  # noise unlike the run's
            for k in range(steps):
                branch.advance(rng, dt_hours / 24.0)
                out[m, wanted[i], k] = branch.state()
    return out


def _advance(grid: Grid, T: np.ndarray, psi: np.ndarray, t: float, dt_days: float, kappa: float,
             relax_days: float) -> np.ndarray:  # fmt: skip
    """One output step: transport substeps, each followed by exact relaxation towards the current equilibrium."""
    fx, fy = face_fluxes(grid, psi)
    n = stable_substeps(grid, fx, fy, kappa, dt_days * DAY)
    h = dt_days / n
    decay = math.exp(-h / relax_days)
    for s in range(n):
        T = T + h * DAY * tendency(grid, T, fx, fy, kappa)
        T_eq = equilibrium_temperature(grid, t + (s + 0.5) * h)
        T = T_eq + (T - T_eq) * decay
    return T


# -- NetCDF -------------------------------------------------------------------------------------------------------

_ATTRS = {
    "T": {"units": "K", "long_name": "temperature-like tracer", "standard_name": "air_temperature"},
    "u": {"units": "m s-1", "long_name": "eastward wind", "standard_name": "eastward_wind"},
    "v": {"units": "m s-1", "long_name": "northward wind", "standard_name": "northward_wind"},
    "insolation": {"units": "W m-2", "long_name": "top-of-atmosphere incoming shortwave flux",
                   "standard_name": "toa_incoming_shortwave_flux"},
}  # fmt: skip


def write_netcdf(
    path: str | Path, fields: dict[str, np.ndarray], attrs: dict[str, Any] | None = None
) -> Path:
    """Write ``simulate``'s output to a CF-style NetCDF-4 file (time, lat, lon), chunked by 32 time records."""
    netCDF4 = require("netCDF4", "NetCDF")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nt, nlat, nlon = fields["T"].shape
    grid = Grid(nlat, nlon)
    # Per process: ranks that each build the data alone (no comm given) may write the same file at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
        nc.Conventions = "CF-1.8"
        nc.title = (
            "Caldera toy atmosphere: tracer advected by stochastic jets and waves, seasonal/diurnal forcing"
        )
        for key, value in (attrs or {}).items():
            nc.setncattr(key, value)
        for name, size in (("time", None), ("lat", nlat), ("lon", nlon)):
            nc.createDimension(name, size)
        coords = {
            "time": (fields["time"], {"units": "days since 2000-03-20 00:00:00", "calendar": "noleap"}),
            "lat": (np.degrees(grid.lat), {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": (np.degrees(grid.lon), {"units": "degrees_east", "standard_name": "longitude"}),
        }
        for name, (values, meta) in coords.items():
            var = nc.createVariable(name, "f8", (name,))
            var.setncatts(meta)
            var[:] = values
        for name in (*STATE, *FORCING):
            var = nc.createVariable(name, "f4", ("time", "lat", "lon"), chunksizes=(min(32, nt), nlat, nlon))
            var.setncatts(_ATTRS[name])
            var[:] = fields[name]
    tmp.replace(path)  # readers never see half a file
    return path


# -- the training data source -------------------------------------------------------------------------------------


def dataset(
    path: str = "climate.nc",
    days: float = 730.0,
    nlat: int = 32,
    nlon: int = 64,
    seed: int = 0,
    window: int = 2,
    lead: int = 1,
    val_fraction: float = 0.2,
    run_dir: str | Path | None = None,
    normalize: bool = True,
    backend: str = "thread",
    rollout: int = 1,
    rollout_every: int = 1,
    comm: Communicator | None = None,
) -> dict[str, Any]:
    """Simulate into the NetCDF file ``path`` (relative: inside the run directory) unless it exists, then serve
    it with ``caldera.data.scientific``: inputs [T, u, v, insolation] at the ``window`` records up to t, targets
    [T, u, v] at t + lead; ``[data] num_workers`` background readers (``backend``: thread or process).
    ``rollout = k > 1`` (with lead 1): samples for k-step training (``Rollout``), e.g. to fine-tune a one-step
    model so that its own errors stop growing when it is rolled out; ``rollout_every = s`` keeps every s-th start
    (a k-step sample costs k one-step ones: long rollouts at the price of short ones). ``comm``: the ranks that share the file and
    its normalisation statistics (rank 0 writes, the others wait); default this process alone."""
    from caldera.data import scientific

    # Lexically normalised: "../other-run/climate.nc" must not need this run's directory to exist yet.
    file = (
        Path(path)
        if run_dir is None or Path(path).is_absolute()
        else Path(os.path.normpath(Path(run_dir) / path))
    )
    made_with = {"days": float(days), "nlat": nlat, "nlon": nlon, "seed": seed}

    def write() -> None:
        _log.info(f"climate: simulating {days:g} days on a {nlat}x{nlon} grid into {file}")
        write_netcdf(
            file, simulate(nlat, nlon, days, seed=seed), {f"caldera_{k}": v for k, v in made_with.items()}
        )

    write_once(file, write, "the climate file", comm=comm)
    _check_made_with(file, made_with)
    data = scientific.dataset(str(file), inputs=[*STATE, *FORCING], targets=list(STATE), window=window, lead=lead,
                              val_fraction=val_fraction, normalize=normalize, run_dir=run_dir, backend=backend,
                              comm=comm)  # fmt: skip
    if rollout == 1:
        return data
    if rollout < 1 or lead != 1 or rollout_every < 1:
        raise ValueError(
            f"rollout = {rollout}, lead = {lead}, rollout_every = {rollout_every}: rollout counts 6-hour steps "
            "(>= 1) from lead = 1, rollout_every keeps every n-th start (>= 1)"
        )
    return {name: Rollout(part, rollout, rollout_every) if part is not None else None
            for name, part in data.items()}  # fmt: skip


class Rollout(BatchReads):
    """Samples for k-step training: the one-step inputs plus the forcings of steps 2..k; targets: the states of
    steps 1..k, stacked step after step (what ``ClimateNet`` returns when given those extra forcings); every
    ``every``-th start only."""

    def __init__(self, base: Any, steps: int, every: int = 1) -> None:
        self.base, self.steps, self.every, self.stats = base, steps, every, base.stats
        newest = base.starts + base.window - 1
        # The k-th target must lie inside the split (valid starts are a prefix; each has all patch corners).
        self.n = -(-int(np.sum(newest + steps < base.records[1])) // every) * len(base.corners)
        if self.n == 0:
            raise ValueError(f"records {base.records} are too few for a {steps}-step rollout")

    def __len__(self) -> int:
        return self.n

    def read_batch(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (window + future forcings) and the k targets of the samples ``indices``, normalised."""
        base, idx = self.base, np.asarray(indices, dtype=np.int64).reshape(-1)
        nc = len(base.corners)
        idx = idx // nc * self.every * nc + idx % nc  # the base dataset's sample of every every-th start
        x, _ = base.read_batch(idx)
        corner = idx % len(base.corners)
        recs = (base.starts[idx // len(base.corners)] + base.window - 1)[:, None] + np.arange(
            1, self.steps + 1
        )
        uniq = np.unique(recs)
        data, pos = base.reader.read(uniq, list(base.kinds)), np.searchsorted(uniq, recs)
        # One record per step, normalised and laid out as the base dataset does for its own inputs and targets.
        future = [
            base._assemble(list(FORCING), data, pos[:, j : j + 1], corner) for j in range(self.steps - 1)
        ]
        targets = [base._assemble(list(STATE), data, pos[:, j : j + 1], corner, target=True)
                   for j in range(self.steps)]  # fmt: skip
        return np.concatenate([x, *future], axis=1), np.concatenate(targets, axis=1)

    def denormalize(self, y: np.ndarray) -> np.ndarray:
        """Predicted states of the k steps back in physical units, step by step."""
        n = len(STATE)
        return np.concatenate(
            [self.base.denormalize(y[:, j * n : (j + 1) * n]) for j in range(self.steps)], axis=1
        )

    def close(self) -> None:
        """Stop the underlying dataset's readers."""
        self.base.close()


def _check_made_with(file: Path, made_with: dict[str, Any]) -> None:
    """Refuse a file simulated with other settings: its data and normalisation would not match the run file."""
    netCDF4 = require("netCDF4", "NetCDF")

    with netCDF4.Dataset(file) as nc:
        found = {
            k: np.asarray(nc.getncattr(f"caldera_{k}")).item()
            for k in made_with
            if f"caldera_{k}" in nc.ncattrs()
        }
    differ = {k: (found.get(k), v) for k, v in made_with.items() if k in found and found[k] != v}
    if differ:
        listing = ", ".join(f"{k}: file {a!r}, run file {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{file} was simulated with other settings ({listing}); delete it (and normalization.json beside it) "
            "to simulate again, or give [data] args.path a new name"
        )


# -- model and metric ---------------------------------------------------------------------------------------------


def lat_weighted_rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Latitude-weighted RMSE of (n, c, lat, lon) fields: per sample and channel, then averaged (WeatherBench)."""
    w = torch.as_tensor(lat_weights(pred.shape[-2]), dtype=pred.dtype, device=pred.device)[:, None]
    mse = ((pred - target) ** 2 * w).mean(dim=(-2, -1))
    return mse.sqrt().mean()


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: list[float] | None = None
) -> torch.Tensor:
    """Latitude-weighted MSE with one weight per variable (GraphCast's loss); (n, k * variables, lat, lon) for
    k-step rollouts. ``increment_weights`` gives the weights that count each variable's 6-hour change alike."""
    w = torch.as_tensor(lat_weights(pred.shape[-2]), dtype=pred.dtype, device=pred.device)[:, None]
    se = ((pred - target) ** 2 * w).mean(dim=(0, -2, -1))  # per channel
    if weights is None:
        return se.mean()
    per_var = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device)
    if per_var.ndim != 1 or len(per_var) == 0 or pred.shape[1] % len(per_var) or (per_var < 0).any():
        # ConfigError: the first step stops with this one line (exit 2), not a traceback from inside training.
        raise ConfigError(
            f"[train] loss_args weights = {list(weights)} for {pred.shape[1]} output channels: give one weight "
            f">= 0 per predicted variable, e.g. weights = [2.35, 0.579, 0.071] for T, u, v"
        )
    return (se.unflatten(0, (-1, len(per_var))) * per_var).mean()


def increment_weights(path: str | Path, stats: dict[str, Any], records: int | None = None) -> list[float]:
    """Per variable, 1 / variance of its normalised 6-hour change over the first ``records`` records, scaled to
    mean 1: the weights of ``weighted_mse`` under which each variable's change counts alike. Normalised by its
    whole range, T changes 6x less in 6 h than v does: plain MSE spends the model on v's unpredictable gusts."""
    from caldera.data import open_reader

    reader = open_reader(path, "netcdf", list(STATE))
    data = reader.read(np.arange(records or len(reader)))
    inv = np.array(
        [1 / (np.diff(data[v].astype(np.float64), axis=0).std() / stats[v].std) ** 2 for v in STATE]
    )
    return (inv / inv.mean()).round(3).tolist()


# -- autoregressive rollout and skill -----------------------------------------------------------------------------


def harmonic_climatology(time: np.ndarray, fields: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Fit mean + annual, semi-annual and diurnal harmonics per grid cell to ``fields`` (t, ...) at ``time``
    (days); return the fit at times ``at``: a climatology that needs only a year or two of data."""

    def basis(t: np.ndarray) -> np.ndarray:
        cols = [np.ones_like(t)]
        for period in (YEAR, YEAR / 2, 1.0):
            cols += [np.cos(2 * np.pi * t / period), np.sin(2 * np.pi * t / period)]
        return np.stack(cols, axis=1)

    flat = fields.reshape(len(time), -1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis(time), flat, rcond=None)
    return (basis(at) @ coef).reshape(len(at), *fields.shape[1:])


def _channels(records: torch.Tensor) -> torch.Tensor:
    """(n, window, c, lat, lon) -> (n, c * window, lat, lon), variable-major as caldera.data.scientific stacks."""
    n, w, c, *grid = records.shape
    return records.transpose(1, 2).reshape(n, c * w, *grid)


@torch.no_grad()
def rollout(
    model: nn.Module, history: np.ndarray, forcing: np.ndarray, steps: int, batch: int = 64
) -> np.ndarray:
    """Roll ``model`` out from normalised states ``history`` (n, window, c, lat, lon), the last being the start,
    with known normalised forcings ``forcing`` (n, window - 1 + steps, f, lat, lon) from the first history
    record on; return the predicted states (n, steps, c, lat, lon)."""
    model.eval()
    device = next(model.parameters()).device
    w = history.shape[1]
    out = np.empty((history.shape[0], steps, *history.shape[2:]), np.float32)
    for lo in range(0, history.shape[0], batch):
        h = torch.as_tensor(history[lo : lo + batch], device=device)
        f = torch.as_tensor(forcing[lo : lo + batch], device=device)
        for k in range(steps):
            pred = model(torch.cat([_channels(h), _channels(f[:, k : k + w])], dim=1))
            out[lo : lo + batch, k] = pred.cpu().numpy()
            h = torch.cat([h[:, 1:], pred[:, None]], dim=1)
    return out


def rmse_by_lead(forecast: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Latitude-weighted RMSE per lead and variable of (n, lead, c, lat, lon) arrays, averaged over starts."""
    w = lat_weights(truth.shape[-2])[:, None]
    mse = ((forecast - truth) ** 2 * w).mean(axis=(-2, -1))
    return np.sqrt(mse).mean(axis=0)


def acc_by_lead(forecast: np.ndarray, truth: np.ndarray, clim: np.ndarray) -> np.ndarray:
    """Anomaly correlation coefficient per lead and variable of (n, lead, c, lat, lon) arrays, averaged over starts:
    anomalies against the climatology ``clim`` (same shape), cos(latitude)-weighted, uncentred (WeatherBench,
    Rasp et al. 2020). A forecast without anomalies (climatology itself) has no correlation: 0."""
    w = lat_weights(truth.shape[-2])[:, None]
    fa, ta = (forecast - clim).astype(np.float64), (truth - clim).astype(np.float64)
    num = (w * fa * ta).sum(axis=(-2, -1))
    den = np.sqrt((w * fa**2).sum(axis=(-2, -1)) * (w * ta**2).sum(axis=(-2, -1)))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0).mean(axis=0)


def activity_by_lead(forecast: np.ndarray, truth: np.ndarray, clim: np.ndarray) -> np.ndarray:
    """Forecast activity per lead and variable: the cos(latitude)-weighted RMS of the forecast's anomalies over
    the truth's, pooled over starts. 1: as lively as the weather; below 1: smoothed towards climatology."""
    w = lat_weights(truth.shape[-2])[:, None]
    fa, ta = (forecast - clim).astype(np.float64), (truth - clim).astype(np.float64)
    return np.sqrt((w * fa**2).sum(axis=(0, -2, -1)) / (w * ta**2).sum(axis=(0, -2, -1)))


def rollout_skill(
    model: nn.Module,
    path: str | Path,
    stats: dict[str, Any],
    val_fraction: float = 0.2,
    max_lead: int = 40,
    every: int = 4,
    window: int = 2,
    period: str = "val",
) -> dict[str, Any]:
    """Score ``model`` on the validation period of the NetCDF ``path``: forecasts started every ``every``
    records, rolled out ``max_lead`` steps; latitude-weighted RMSE in physical units (``model``, ``persistence``,
    ``climatology``) and anomaly correlation against the harmonic climatology of the training period
    (``model_acc``, ...) and the model's activity (``model_activity``), each (lead, variable).
    ``period = "train"`` starts the forecasts in the training period instead (to fit post-processing such as
    ``fit_damping`` on data the scores never see)."""
    from caldera.data import open_reader

    reader = open_reader(path, "netcdf", [*STATE, *FORCING])
    n = len(reader)
    n_train = n - int(n * val_fraction)
    data = reader.read(np.arange(n))
    time = _times(path, n)
    if period not in ("val", "train"):
        raise ValueError(f"period = {period!r}: choose 'val' (scores) or 'train' (fitting post-processing)")
    first, end = (n_train + window - 1, n) if period == "val" else (window - 1, n_train)
    starts = np.arange(first, end - max_lead, every)
    if starts.size == 0:
        raise ValueError(
            f"{period} period of {path} ({end - first} records) is shorter than max_lead={max_lead}"
        )
    phys = np.stack([data[v] for v in STATE], axis=1)  # (t, c, lat, lon)
    mean = np.array([stats[v].mean for v in STATE], np.float32)[:, None, None]
    std = np.array([stats[v].std for v in STATE], np.float32)[:, None, None]
    f_norm = np.stack([stats[v].apply(data[v]) for v in FORCING], axis=1)
    leads = np.arange(1, max_lead + 1)
    idx = starts[:, None] + leads[None, :]  # (n_starts, lead)
    past = starts[:, None] + np.arange(1 - window, 1)[None, :]
    forcing = f_norm[starts[:, None] + np.arange(1 - window, max_lead)[None, :]]
    pred = rollout(model, (phys[past] - mean) / std, forcing, max_lead) * std + mean
    truth = phys[idx]
    clim = harmonic_climatology(time[:n_train], phys[:n_train], time)[idx]
    persist = np.broadcast_to(phys[starts][:, None], truth.shape)
    return {
        "lead_hours": leads * float(np.median(np.diff(time))) * 24,
        "variables": list(STATE),
        "model": rmse_by_lead(pred, truth),
        "persistence": rmse_by_lead(persist, truth),
        "climatology": rmse_by_lead(clim, truth),
        "model_acc": acc_by_lead(pred, truth, clim),
        "model_activity": activity_by_lead(pred, truth, clim),
        "persistence_acc": acc_by_lead(persist, truth, clim),
        "climatology_acc": acc_by_lead(clim, truth, clim),
        "starts": starts,
        "forecast": pred,
        "truth": truth,
        "clim": clim,
        "persist": persist,
    }


def perfect_model_skill(path: str | Path, skill: dict[str, Any], members: int = 8) -> dict[str, np.ndarray]:
    """Scores of ``perfect_model_forecasts`` from the same starts as ``skill`` (``rollout_skill`` on the file
    ``path``, which names the simulation's settings): ``perfect`` (one member, a perfect sharp forecast) and
    ``perfect_mean`` (the ``members``' mean), RMSE and ``_acc`` per lead and variable."""
    netCDF4 = require("netCDF4", "NetCDF")

    with netCDF4.Dataset(path) as nc:
        made = {k: np.asarray(nc.getncattr(f"caldera_{k}")).item() for k in ("days", "nlat", "nlon", "seed")}
    steps = skill["truth"].shape[1]
    runs = perfect_model_forecasts(skill["starts"], steps, members, made["nlat"], made["nlon"], made["days"],
                                   int(made["seed"]))  # fmt: skip
    truth, clim, mean = skill["truth"], skill["clim"], runs.mean(axis=0)
    return {"perfect": rmse_by_lead(runs[0], truth), "perfect_acc": acc_by_lead(runs[0], truth, clim),
            "perfect_mean": rmse_by_lead(mean, truth), "perfect_mean_acc": acc_by_lead(mean, truth, clim)}  # fmt: skip


def fit_damping(skill: dict[str, Any], forecast: str = "forecast") -> np.ndarray:
    """Per lead and variable, the factor in [0, 1] by which to shrink the forecast's anomaly (against the
    climatology) to minimise its latitude-weighted squared error: the regression of the true anomaly on the
    forecast's over ``skill``'s forecasts (fit on the training period); ``forecast = "persist"``: of persistence
    (damped persistence, the baseline of a damped forecast). A deterministic forecast keeps the full amplitude of
    anomalies it can no longer place; the RMSE-optimal one fades them as skill is lost."""
    w = lat_weights(skill["truth"].shape[-2])[:, None]
    fa = (skill[forecast] - skill["clim"]).astype(np.float64)
    ta = (skill["truth"] - skill["clim"]).astype(np.float64)
    num, den = (w * fa * ta).sum(axis=(0, -2, -1)), (w * fa**2).sum(axis=(0, -2, -1))
    return np.clip(np.divide(num, den, out=np.ones_like(num), where=den > 0), 0.0, 1.0)


def damped(skill: dict[str, Any], factor: np.ndarray, forecast: str = "forecast") -> np.ndarray:
    """Forecasts of ``skill`` with their anomalies shrunk by ``factor`` (lead, variable) from ``fit_damping``."""
    return skill["clim"] + factor[None, :, :, None, None] * (skill[forecast] - skill["clim"])


def last_lead_better(lead_hours: np.ndarray, better: np.ndarray) -> float | None:
    """The last lead (h) of the unbroken run of leads, from the first, at which ``better`` holds (None: not even
    at the first)."""
    worse = np.flatnonzero(~better)
    end = worse[0] if worse.size else len(better)
    return float(lead_hours[end - 1]) if end else None


def skill_over_runs(skills: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over runs (training seeds) of each score of ``rollout_skill`` (``name``, ``name_sd``, and
    ``name_runs`` stacked); in ``crossings``, per variable, the lead up to which the model beats each baseline
    (its mean; its mean + sd; each run) and up to which its mean ACC stays >= ``USEFUL_ACC``."""
    lead = skills[0]["lead_hours"]
    out: dict[str, Any] = {"runs": len(skills), "starts": len(skills[0]["starts"])}
    out.update(lead_hours=lead.tolist(), variables=skills[0]["variables"])
    names = ["model", "persistence", "climatology", "model_acc", "persistence_acc", "climatology_acc"]
    names += ["model_activity"] if "model_activity" in skills[0] else []
    names += ["damped", "damped_persistence"] if "damped" in skills[0] else []
    for name in names:
        runs = np.stack([s[name] for s in skills])
        out[name] = runs.mean(axis=0)
        out[name + "_sd"] = runs.std(axis=0, ddof=1) if len(skills) > 1 else np.zeros_like(runs[0])
        out[name + "_runs"] = runs
    if "damping" in skills[0]:
        out["damping"] = np.stack([s["damping"] for s in skills]).mean(axis=0)
    cross = {}
    for i, var in enumerate(out["variables"]):
        row = {}
        for model in ("model", "damped")[: 1 + ("damped" in out)]:
            for base in (
                "persistence",
                "climatology",
                *(["damped_persistence"] if model == "damped" else []),
            ):
                mean, sd, ref = out[model][:, i], out[model + "_sd"][:, i], out[base][:, i]
                row[f"{model}_beats_{base}_until_h"] = last_lead_better(lead, mean < ref)
                row[f"{model}_beats_{base}_until_h_mean_plus_sd"] = last_lead_better(lead, mean + sd < ref)
                row[f"{model}_beats_{base}_until_h_each_run"] = [
                    last_lead_better(lead, r[:, i] < ref) for r in out[model + "_runs"]
                ]
        row["model_acc_useful_until_h"] = last_lead_better(lead, out["model_acc"][:, i] >= USEFUL_ACC)
        row["persistence_acc_useful_until_h"] = last_lead_better(
            lead, out["persistence_acc"][:, i] >= USEFUL_ACC
        )
        cross[var] = row
    out["crossings"] = cross
    return out


def _times(path: str | Path, n: int) -> np.ndarray:
    """The file's time coordinate in days (the reader skips coordinate variables)."""
    netCDF4 = require("netCDF4", "NetCDF")

    with netCDF4.Dataset(path) as nc:
        return np.asarray(nc.variables["time"][:n], dtype=np.float64)
