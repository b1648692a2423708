"""Chirps in coloured noise: a long strain-like record with injected inspirals, the windows a detector network
learns from, and the matched-filter search that is the classical baseline.

**Noise.** Unit white Gaussian noise ``w`` through a fixed colouring filter ``h`` (a linear-phase FIR of
``COLOUR_TAPS`` taps) whose amplitude response follows a detector-like spectrum: a steep low-frequency wall below
``F_KNEE`` (seismic), flat in the bucket, rising above ``F_HIGH`` (shot noise)::

    ASD(f) ~ sqrt(1 + (F_KNEE / f)^8 + (f / F_HIGH)^2)

The one-sided PSD is known exactly: ``S(f) = 2 |H(f)|^2 / FS`` with ``H`` the filter's response; whitening
divides by ``|H|``, which turns the noise back into unit white noise.

**Chirps.** A Newtonian inspiral in toy units, one parameter ``m`` (a chirp mass): frequency rises as a power law
in the time to coalescence, ``f(tau) = F_LOW (tau / T)^(-3/8)`` with ``T = T0 m^(-5/3)`` (heavier: shorter),
amplitude ``~ f^(2/3)``; the inspiral stops at the merger cutoff ``f_end = F_END0 / m`` (capped below Nyquist)
and rings down for a few cycles at ``f_end``. The *merger time* is the cutoff's time. The amplitude is set so that
the optimal (matched-filter) SNR against the known PSD is the injected SNR: the norm of the whitened waveform.

``write_record`` writes a record (float32 ``.npy``, written block by block under a hidden name and renamed when
complete), its injection catalogue (``.injections.csv``) and its description (``.json``). ``dataset`` is the
``[data] source`` ``chirp``: whitened training windows with and without a chirp, or, with ``record = PATH``,
the record cut into overlapping chunks for ``caldera predict`` (every window of the scan lies wholly in one chunk,
so no chirp is cut at a boundary). ``matched_filter`` is the baseline; ``triggers`` and ``evaluate`` turn any
detection-statistic series into detections, true positives by SNR and false alarms per day.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import fft as sfft
from scipy import signal
from torch.utils.data import Dataset, TensorDataset

from caldera.data.formats import DataError
from caldera.io import atomic_write_text

FS = 256  # samples per second: a month is 663 M float32 samples (2.65 GB)
F_KNEE, F_HIGH = 25.0, 80.0  # Hz: the low-frequency wall and the high-frequency rise of the noise spectrum
F_FLOOR = 5.0  # Hz: the wall stops rising below this (the filter's gain is finite)
COLOUR_TAPS, WHITEN_TAPS = 257, 129  # FIR lengths (odd: linear phase, whole-sample delay)
F_LOW = 20.0  # Hz: a chirp enters the band here
T0, F_END0 = 2.0, 100.0  # s, Hz: duration above F_LOW and merger cutoff at m = 1
MASS = (0.8, 1.6)  # chirp-mass range (toy units): 2.9 s / 62 Hz ... 0.9 s / 110 Hz
SNR = (5.0, 20.0)  # training SNRs: uniform between these
WINDOW = 512  # samples (2 s) a detector window sees
ZONE = (0.55, 0.95)  # a positive window has its merger this far into it (fraction of the window)
RINGDOWN_CYCLES = 3.0  # the ringdown decays with a time constant of this many cycles at f_end
F_CAP = 0.43 * FS  # Hz: merger cutoffs stay below Nyquist
_BLOCK = 1 << 20  # record samples generated per block (4 096 s): bounded memory; block b has its own stream
_WINDOWS_BLOCK = 1024  # training windows per seeded block


# -- the noise ----------------------------------------------------------------------------------------------------


def asd_shape(f: np.ndarray) -> np.ndarray:
    """The design amplitude spectral density (relative units) at frequencies ``f`` in Hz."""
    f = np.maximum(np.abs(np.asarray(f, dtype=np.float64)), F_FLOOR)
    return np.sqrt(1.0 + (F_KNEE / f) ** 8 + (f / F_HIGH) ** 2)


def colour_filter() -> np.ndarray:
    """The colouring FIR ``h`` (white noise * h is the detector noise)."""
    f = np.linspace(0.0, FS / 2, 513)
    return signal.firwin2(COLOUR_TAPS, f, asd_shape(f), fs=FS)


def whiten_filter() -> np.ndarray:
    """A short FIR ``g`` with ``|G| ~ 1/|H|``: the time-domain whitening the network's inputs go through (exact
    under cutting into chunks, since it is a finite convolution)."""
    f = np.linspace(0.0, FS / 2, 257)
    return signal.firwin2(WHITEN_TAPS, f, 1.0 / np.abs(np.fft.rfft(colour_filter(), 512)), fs=FS)


def response(n: int) -> np.ndarray:
    """``|H|`` on the ``rfft`` grid of length ``n``: the known PSD is ``2 |H|^2 / FS``."""
    return np.abs(np.fft.rfft(colour_filter(), n))


def psd(f: np.ndarray) -> np.ndarray:
    """The known one-sided PSD (per Hz) at frequencies ``f``."""
    n = 1 << 16
    return np.interp(np.abs(f), np.fft.rfftfreq(n, 1 / FS), 2.0 * response(n) ** 2 / FS)


# -- the chirps ---------------------------------------------------------------------------------------------------


def duration(mass: float | np.ndarray) -> np.ndarray:
    """Seconds from F_LOW to coalescence."""
    return T0 * np.asarray(mass, dtype=np.float64) ** (-5.0 / 3.0)


def f_end(mass: float | np.ndarray) -> np.ndarray:
    """The merger cutoff frequency in Hz."""
    return np.minimum(F_END0 / np.asarray(mass, dtype=np.float64), F_CAP)


def support(mass: float) -> tuple[float, float]:
    """Seconds before and after the merger time in which the chirp is non-zero."""
    tau_end = duration(mass) * (F_LOW / f_end(mass)) ** (8.0 / 3.0)
    return float(duration(mass) - tau_end), float(10.0 * RINGDOWN_CYCLES / f_end(mass))


def waveform(t: np.ndarray, mass: float, phase: float = 0.0) -> np.ndarray:
    """The unit-amplitude chirp at times ``t`` (s) relative to its merger time (0)."""
    t = np.asarray(t, dtype=np.float64)
    big_t, fe = float(duration(mass)), float(f_end(mass))
    tau_end = big_t * (F_LOW / fe) ** (8.0 / 3.0)
    tau = np.maximum(tau_end - t, tau_end)  # time to coalescence, held at the cutoff afterwards
    f = F_LOW * (tau / big_t) ** -0.375
    # phase = 2 pi * integral of f dt; zero at the merger time
    k = 2.0 * np.pi * F_LOW * big_t**0.375 / 0.625
    phi = phase - k * (tau**0.625 - tau_end**0.625)
    inspiral = (f / fe) ** (2.0 / 3.0) * np.cos(phi)
    ring = np.exp(-t * fe / RINGDOWN_CYCLES) * np.cos(phase + 2.0 * np.pi * fe * t)
    out = np.where(t <= 0, inspiral, ring)
    before, after = support(mass)
    ramp = np.clip((t + before) / 0.1, 0.0, 1.0)  # a 0.1 s taper where it enters the band
    out *= 0.5 - 0.5 * np.cos(np.pi * ramp)
    return np.where((t >= -before) & (t <= after), out, 0.0)


def optimal_snr(x: np.ndarray) -> float:
    """The matched-filter SNR of signal ``x`` (samples at FS) in the known noise: the norm of ``x`` whitened."""
    n = sfft.next_fast_len(len(x) + 2 * COLOUR_TAPS)
    return float(np.linalg.norm(np.fft.irfft(np.fft.rfft(x, n) / response(n), n)))


def chirp(mass: float, snr: float, phase: float = 0.0, offset: float = 0.0) -> tuple[np.ndarray, int]:
    """The chirp at optimal SNR ``snr`` sampled at FS with its merger ``offset`` (0..1) of a sample after sample
    ``i0``: (samples, i0) where i0 is the merger's index in them."""
    before, after = support(mass)
    i0 = int(np.ceil(before * FS)) + 1
    t = (np.arange(i0 + int(np.ceil(after * FS)) + 1) - i0 - offset) / FS
    x = waveform(t, mass, phase)
    return x * (snr / optimal_snr(x)), i0


# -- the record -----------------------------------------------------------------------------------------------------


@dataclass
class Injections:
    """The catalogue of a record: merger times (s from the record's start), optimal SNRs, masses, phases."""

    time: np.ndarray
    snr: np.ndarray
    mass: np.ndarray
    phase: np.ndarray

    def __len__(self) -> int:
        return len(self.time)


def schedule(seconds: float, every: float, snr: tuple[float, float], mass: tuple[float, float],
             seed: int) -> Injections:  # fmt: skip
    """Injections about every ``every`` seconds (jittered by a quarter of that, never within 8 s of each
    other or of the record's ends), SNR and mass uniform in their ranges, phase uniform."""
    rng = np.random.default_rng([seed, 7_777_777])
    slots = np.arange(every, seconds - 8.0, every)
    t = slots + rng.uniform(-every / 4, every / 4, size=len(slots))
    t = t[(t > 8.0) & (t < seconds - 8.0)]
    k = len(t)
    return Injections(
        t, rng.uniform(*snr, size=k), rng.uniform(*mass, size=k), rng.uniform(0, 2 * np.pi, size=k)
    )


def meta_path(path: Path) -> Path:
    """The record's description: sample rate, length, seed, noise model."""
    return Path(path).with_suffix(".json")


def catalogue_path(path: Path) -> Path:
    """The record's injection catalogue (CSV)."""
    return Path(path).with_suffix(".injections.csv")


def write_record(path: str | Path, seconds: float, every: float = 200.0, snr: tuple[float, float] = (4.0, 24.0),
                 mass: tuple[float, float] = MASS, seed: int = 0) -> Injections:  # fmt: skip
    """Write ``seconds`` of noise with chirps injected about every ``every`` seconds to ``path`` (.npy, float32),
    block by block (memory: a few blocks), under a hidden name renamed when complete; the catalogue and the
    description beside it. Deterministic given ``seed``."""
    path = Path(path)
    n = int(round(seconds * FS))
    if n < 4 * WINDOW or every <= 16 or not 0 < snr[0] <= snr[1] or not 0 < mass[0] <= mass[1]:
        raise DataError(f"record: {seconds} s, every {every} s, snr {snr}, mass {mass}: need at least "
                        f"{4 * WINDOW / FS:g} s, injections more than 16 s apart, 0 < low <= high")  # fmt: skip
    inj = schedule(n / FS, every, snr, mass, seed)
    h = colour_filter()
    # Each injection once: its samples and where they start in the record.
    chirps = []
    for t, s, m, p in zip(inj.time, inj.snr, inj.mass, inj.phase):
        whole = t * FS
        x, i0 = chirp(m, s, p, offset=whole - np.floor(whole))
        chirps.append((int(np.floor(whole)) - i0, x))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tail = np.random.default_rng([seed, 2]).standard_normal(COLOUR_TAPS - 1)  # white noise before sample 0
    c = 0
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
        for start in range(0, n, _BLOCK):
            k = min(_BLOCK, n - start)
            w = np.random.default_rng([seed, 0, start // _BLOCK]).standard_normal(k)
            block = signal.oaconvolve(np.concatenate([tail, w]), h, mode="valid")
            tail = np.concatenate([tail, w])[-(COLOUR_TAPS - 1) :]
            while c < len(chirps) and chirps[c][0] + len(chirps[c][1]) <= start:
                c += 1
            for i0, x in chirps[c:]:
                if i0 >= start + k:
                    break
                a, b = max(i0, start), min(i0 + len(x), start + k)
                block[a - start : b - start] += x[a - i0 : b - i0]
            f.write(block.astype("<f4").tobytes())
    os.replace(tmp, path)
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["merger_time_s", "snr", "mass", "phase"])
    out.writerows(zip(*(np.round(v, 6).tolist() for v in (inj.time, inj.snr, inj.mass, inj.phase))))
    atomic_write_text(catalogue_path(path), buf.getvalue())
    meta = {"sample_rate_hz": FS, "samples": n, "seconds": n / FS, "seed": seed, "injections": len(inj),
            "every_s": every, "snr": list(snr), "mass": list(mass),
            "noise": {"asd": "sqrt(1 + (f_knee/f)^8 + (f/f_high)^2)", "f_knee": F_KNEE, "f_high": F_HIGH,
                      "f_floor": F_FLOOR, "colour_taps": COLOUR_TAPS}}  # fmt: skip
    atomic_write_text(meta_path(path), json.dumps(meta, indent=2))
    return inj


def read_catalogue(path: str | Path) -> Injections:
    """The injections of the record at ``path``."""
    rows = np.loadtxt(catalogue_path(Path(path)), delimiter=",", skiprows=1, ndmin=2)
    return Injections(*(rows[:, i] for i in range(4)))


def open_record(path: str | Path) -> np.ndarray:
    """The record's samples, memory-mapped (float32); one clear error when it is not a record."""
    path = Path(path)
    if not path.is_file() or not meta_path(path).is_file():
        raise DataError(f"[data] args.record = '{path}': no such record (write one with "
                        "`python examples/chirp_eval.py --write-record PATH --days D`)")  # fmt: skip
    meta = json.loads(meta_path(path).read_text())
    if meta.get("sample_rate_hz") != FS:
        raise DataError(
            f"record {path}: sampled at {meta.get('sample_rate_hz')} Hz, the chirp detector at {FS} Hz"
        )
    return np.load(path, mmap_mode="r")


# -- training windows ------------------------------------------------------------------------------------------------


def windows(n: int, window: int = WINDOW, snr: tuple[float, float] = SNR, mass: tuple[float, float] = MASS,
            seed: int = 0, positive: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``n`` whitened windows (n, window) float32 of noise, a fraction ``positive`` of them with a chirp whose
    merger lies in ZONE of the window; labels (n,) 0/1 and the injected SNRs (0 without a chirp)."""
    h, g = colour_filter(), whiten_filter()
    raw = window + WHITEN_TAPS - 1
    xs, ys, ss = [], [], []
    for b in range((n + _WINDOWS_BLOCK - 1) // _WINDOWS_BLOCK):
        k = min(_WINDOWS_BLOCK, n - b * _WINDOWS_BLOCK)
        rng = np.random.default_rng([seed, b])
        w = rng.standard_normal((k, raw + COLOUR_TAPS - 1))
        x = signal.oaconvolve(w, h[None], mode="valid", axes=1)
        label = rng.uniform(size=k) < positive
        s = np.where(label, rng.uniform(*snr, size=k), 0.0)
        m, p = rng.uniform(*mass, size=k), rng.uniform(0, 2 * np.pi, size=k)
        where = (WHITEN_TAPS - 1) // 2 + rng.uniform(*ZONE, size=k) * window  # merger, in raw samples
        for i in np.nonzero(label)[0]:
            y, i0 = chirp(m[i], s[i], p[i], offset=where[i] - np.floor(where[i]))
            a = int(np.floor(where[i])) - i0
            lo, hi = max(a, 0), min(a + len(y), raw)
            x[i, lo:hi] += y[lo - a : hi - a]
        xs.append(signal.oaconvolve(x, g[None], mode="valid", axes=1).astype(np.float32))
        ys.append(label.astype(np.int64))
        ss.append(s)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


class RecordChunks(Dataset):
    """A long record as overlapping whitened chunks for scanning: chunk i holds whitened samples
    ``[i hop, i hop + hop + window - 1)``, so a fully convolutional detector of window ``window`` and total stride
    ``s`` (dividing ``hop``) scores exactly the windows starting at ``i hop + j s``, j < hop / s: every window of
    the record in one chunk, none twice. Past the record's end the input is zeros (those scores are dropped)."""

    def __init__(self, path: str | Path, hop: int, window: int) -> None:
        self.path, self.hop, self.window = Path(path), hop, window
        self.samples = len(open_record(path))
        self.g = whiten_filter()
        whitened = self.samples - (WHITEN_TAPS - 1)
        self.windows_total = whitened - window + 1  # windows at unit stride that fit the whitened record
        self.targets: list = []  # nothing to score: `caldera predict` writes the scores without a loss
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return (self.windows_total + self.hop - 1) // self.hop

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._data is None:  # opened in the reading process (a DataLoader worker may be another one)
            self._data = open_record(self.path)
        span = self.hop + self.window - 1 + WHITEN_TAPS - 1
        raw = np.zeros((len(indices), span), dtype=np.float64)
        for r, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(i)
            part = self._data[i * self.hop : i * self.hop + span]
            raw[r, : len(part)] = part
        x = signal.oaconvolve(raw, self.g[None], mode="valid", axes=1).astype(np.float32)
        # The target is a placeholder: each sample is (input, target) for the pipeline; targets = [] says so.
        return [(torch.from_numpy(row[None]), torch.zeros((), dtype=torch.int64)) for row in x]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]


def dataset(n: int = 16000, window: int = WINDOW, snr: list[float] = SNR, mass: list[float] = MASS,
            seed: int = 0, val_fraction: float = 0.1, record: str | None = None,
            hop: int = 16384) -> dict[str, Dataset]:  # fmt: skip
    """Return ``{"train", "val"}``: whitened windows (1, window) -> label (0 noise, 1 chirp), validation a separate
    stream (seed + 1); or, with ``record``, ``{"train"}``: that record's chunks for scanning (``RecordChunks``)."""
    if window < 64 or hop < 1 or not 0 < snr[0] <= snr[1] or not 0 < mass[0] <= mass[1]:
        raise DataError(f"[data] args: window = {window}, hop = {hop}, snr = {snr}, mass = {mass}: need a window of "
                        "at least 64 samples, hop >= 1 and ranges with 0 < low <= high")  # fmt: skip
    if record is not None:
        return {"train": RecordChunks(record, hop, window)}
    n_val = int(round(n * val_fraction))
    out: dict[str, Dataset] = {}
    for name, count, s in (("train", n - n_val, seed), ("val", n_val, seed + 1)):
        if count > 0:
            x, y, _ = windows(count, window, tuple(snr), tuple(mass), seed=s)
            out[name] = TensorDataset(torch.from_numpy(x[:, None]), torch.from_numpy(y))
    return out


# -- scanning: statistic series, triggers, evaluation ----------------------------------------------------------------


def scan_series(
    pred: np.ndarray, samples: int, hop: int, window: int = WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """``caldera predict``'s output over RecordChunks of ``hop`` (chunks, 2, positions) of logits -> (estimated
    merger times in s, statistic = logit(chirp) - logit(noise)) for every scanned window inside the record."""
    pred = np.asarray(pred)
    positions = pred.shape[-1]
    stride = hop // positions
    if stride * positions != hop:
        raise DataError(f"scores with {positions} positions per chunk do not divide the chunk's hop {hop}")
    stat = (pred[:, 1] - pred[:, 0]).reshape(-1)
    starts = samples - (WHITEN_TAPS - 1) - window + 1  # window starts at unit stride in the whitened record
    keep = (starts + stride - 1) // stride
    start = np.arange(keep) * stride + (WHITEN_TAPS - 1) // 2  # window start in record samples
    return (start + np.mean(ZONE) * window) / FS, stat[:keep]


def triggers(
    times: np.ndarray, stat: np.ndarray, threshold: float, cluster: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``stat`` above ``threshold`` at least ``cluster`` seconds apart: (times, values)."""
    dt = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    peaks, _ = signal.find_peaks(stat, height=threshold, distance=max(1, int(round(cluster / dt))))
    return times[peaks], stat[peaks]


def evaluate(trig_t: np.ndarray, trig_v: np.ndarray, inj: Injections, seconds: float, far_per_day: float = 1.0,
             tolerance: float = 1.0, veto: float = 4.0, bins: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Detections against the catalogue at the threshold that gives ``far_per_day`` false alarms per day.

    A trigger within ``tolerance`` s of an injection's merger finds it; one farther than ``veto`` s from every
    injection is a false alarm (between the two: the chirp's own early inspiral, neither). The false-alarm rate
    is per day of the time outside the vetoes."""
    order = np.argsort(inj.time)
    it = inj.time[order]
    near = np.searchsorted(it, trig_t)
    dist = np.full(len(trig_t), np.inf)
    which = np.full(len(trig_t), -1)
    for cand in (near - 1, near):
        ok = (cand >= 0) & (cand < len(it))
        d = np.where(ok, np.abs(trig_t - it[np.clip(cand, 0, len(it) - 1)]), np.inf)
        better = d < dist
        dist[better], which[better] = d[better], order[np.clip(cand, 0, len(it) - 1)][better]
    background = np.sort(trig_v[dist > veto])[::-1]
    live_days = max(seconds - 2 * veto * len(inj), 1.0) / 86400.0
    allowed = int(np.floor(far_per_day * live_days))
    threshold = float(background[allowed]) if allowed < len(background) else float(trig_v.min(initial=0.0))
    above = trig_v > threshold
    found = np.zeros(len(inj), dtype=bool)
    found[which[above & (dist <= tolerance)]] = True
    bins = np.arange(4.0, 26.0, 2.0) if bins is None else bins
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (inj.snr >= lo) & (inj.snr < hi)
        rows.append({"snr": [float(lo), float(hi)], "injected": int(sel.sum()), "found": int(found[sel].sum()),
                     "efficiency": float(found[sel].mean()) if sel.any() else float("nan")})  # fmt: skip
    return {"threshold": threshold, "false_alarms": int((background > threshold).sum()),
            "false_alarms_per_day": float((background > threshold).sum() / live_days), "live_days": live_days,
            "found": int(found.sum()), "injected": len(inj), "by_snr": rows, "found_mask": found}  # fmt: skip


# -- the matched filter ---------------------------------------------------------------------------------------------


def bank(n: int = 32, mass: tuple[float, float] = MASS) -> np.ndarray:
    """Template masses, evenly spaced in duration (~ m^(-5/3)): the chirp's cycle count, which is what a template's
    phase has to track, grows with its duration."""
    return np.sort(duration_mass(np.linspace(*duration(np.asarray(mass))[::-1], n)))


def duration_mass(t: np.ndarray) -> np.ndarray:
    """The mass whose chirp lasts ``t`` seconds above F_LOW (the inverse of ``duration``)."""
    return (np.asarray(t, dtype=np.float64) / T0) ** (-3.0 / 5.0)


def matched_filter(record: np.ndarray, masses: np.ndarray, segment: int = 1 << 16, step: float = 1 / 16,
                   workers: int = 1) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The matched-filter SNR of the record, maximised over the bank's templates and their phase, per ``step``
    seconds: (merger times in s, SNR). Overlap-save FFT correlation in segments of ``segment`` samples, each
    weighted by the known PSD (``conj(X) D / |H|^2``, X the template scaled to unit optimal SNR)."""
    n = len(record)
    resp2 = response(segment) ** 2
    shapes = [chirp(m, 1.0) for m in masses]  # unit optimal SNR: unit whitened norm
    # single precision: the SNR needs 3 digits, and the FFTs run twice as fast
    templates = np.stack([np.conj(np.fft.rfft(x, segment)) / resp2 for x, _ in shapes]).astype(np.complex64)
    ends = np.array([i0 for _, i0 in shapes])  # the merger's index in each template
    # The inverse-PSD weighting spreads a template this far: only lags clear of wrap-around are kept.
    margin = 2 * COLOUR_TAPS
    pool = int(round(step * FS))
    valid = segment - max(len(x) for x, _ in shapes) - 2 * margin
    valid -= valid % pool
    if valid <= 0:
        raise DataError(f"matched filter: segment {segment} is too short for the bank's longest template")
    bins = (n + pool - 1) // pool
    out = np.zeros(bins, dtype=np.float32)
    width = valid + int(ends.max())
    for start in range(0, n, valid):
        # lag k of segment [start - margin, ...): the template starts at start - margin + k; lags margin.. are valid
        d = np.zeros(segment, dtype=np.float32)
        lo = start - margin
        part = record[max(lo, 0) : lo + segment]
        d[max(-lo, 0) : max(-lo, 0) + len(part)] = part
        spec = sfft.rfft(d, workers=workers)
        # analytic correlation: positive frequencies doubled, negative zero -> |z| = sqrt(c_0^2 + c_90^2)
        full = np.zeros((len(masses), segment), dtype=np.complex64)
        full[:, : segment // 2 + 1] = templates * spec
        full[:, 1 : segment // 2] *= 2.0
        z = np.abs(sfft.ifft(full, axis=1, workers=workers))[:, margin : margin + valid]
        # column c: merger at sample start + c (template r starts at start + c - ends[r])
        snr = np.zeros(width, dtype=np.float32)
        for r in range(len(masses)):
            np.maximum(snr[ends[r] : ends[r] + valid], z[r], out=snr[ends[r] : ends[r] + valid])
        b0, m = start // pool, width // pool
        hi = min(b0 + m, bins)
        pooled = snr[: m * pool].reshape(m, pool).max(1)
        np.maximum(out[b0:hi], pooled[: hi - b0], out=out[b0:hi])
    return (np.arange(bins) * pool + pool / 2) / FS, out
