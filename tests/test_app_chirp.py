"""Chirps in coloured noise: the record's noise has the PSD it claims, the matched filter finds the injections at
their SNR and time, and a briefly trained CNN ensemble scanning the record through `caldera predict` on two ranks
finds them too, with the same scores as one process and as the unchunked record (no loss at chunk boundaries)."""

import importlib.util
import json
import statistics

import numpy as np
import pytest
import torch
from scipy import signal

from caldera.config import load_config
from caldera.data.formats import DataError
from caldera.errors import ConfigError
from caldera.models.chirp import ChirpNet
from caldera.predict import predict
from caldera.sims import chirp
from caldera.train.run import load_run_model, train
from caldera.train.rundir import RunDir
from tests.conftest import ROOT, run_ranks

HOP = 2048  # samples per chunk: a 300 s record is 38 chunks, so boundaries are everywhere
BRIEF = ["data.args.n=2000", "data.args.snr=[8.0, 20.0]", "model.args.width=4", "optim.epochs=2",
         "train.progress=false", "train.plot=false"]  # fmt: skip


def test_noise_has_its_psd_and_the_matched_filter_finds_each_chirp_at_its_snr_and_time(tmp_path):
    # Pure noise (no injection fits): Welch's estimate follows the known PSD across the band.
    quiet = tmp_path / "quiet.npy"
    assert len(chirp.write_record(quiet, 600, every=1e9, seed=2)) == 0
    f, est = signal.welch(np.load(quiet).astype(np.float64), fs=chirp.FS, nperseg=1024)
    band = (f > 10) & (f < 120)
    ratio = est[band] / chirp.psd(f[band])
    assert abs(np.median(ratio) - 1) < 0.05 and ratio.min() > 0.7 and ratio.max() < 1.4, ratio
    # A record with chirps: deterministic given its seed, written whole, with its catalogue and description.
    rec = tmp_path / "rec.npy"
    inj = chirp.write_record(rec, 300, every=25, snr=(8.0, 20.0), seed=5)
    again = chirp.write_record(tmp_path / "again.npy", 300, every=25, snr=(8.0, 20.0), seed=5)
    assert np.array_equal(np.load(rec), np.load(tmp_path / "again.npy")) and np.array_equal(
        inj.time, again.time
    )
    assert not list(tmp_path.glob(".*partial"))
    back = chirp.read_catalogue(rec)
    np.testing.assert_allclose(back.time, inj.time, atol=1e-6)
    assert len(inj) >= 10 and json.loads(chirp.meta_path(rec).read_text())["samples"] == 300 * chirp.FS
    # The injected SNR is the optimal one: the template bank recovers it (within noise), at the merger time.
    # A bank of 24 matches every chirp of the mass range to >= 0.93 (docs/chirp.md); the noise adds about +-1.
    t, snr = chirp.matched_filter(np.load(rec), chirp.bank(24), segment=1 << 14)
    for t0, s in zip(inj.time, inj.snr):
        near = np.abs(t - t0) < 1.0
        assert 0.93 * s - 1.5 < snr[near].max() < s + 1.5, (t0, s, snr[near].max())
        assert abs(t[near][snr[near].argmax()] - t0) < 0.1
    result = chirp.evaluate(*chirp.triggers(t, snr, 5.0), inj, 300.0, far_per_day=0.0)
    assert result["found"] == len(inj) and result["false_alarms"] == 0 and result["threshold"] < 7.0
    with pytest.raises(ConfigError, match="at least 120 samples"):
        ChirpNet(window=100)
    with pytest.raises(DataError, match="no such record"):  # `caldera predict`: one line, exit 2
        chirp.dataset(record=str(tmp_path / "missing.npy"))


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two CNNs trained briefly from the run file (two widths' worth of difference: seeds 0 and 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("chirp")
    runs = []
    for seed in (0, 1):
        cfg = load_config(
            ROOT / "examples" / "chirp.toml", [*BRIEF, f"run.seed={seed}", f"run.dir={tmp / str(seed)}"]
        )
        train(cfg)
        runs.append(tmp / str(seed))
    rec = tmp / "rec.npy"
    chirp.write_record(rec, 300, every=25, snr=(12.0, 20.0), seed=7)
    yield tmp, runs, rec
    torch.set_num_threads(before)


@pytest.mark.mpi
def test_ensemble_scan_on_two_ranks_finds_the_chirps_and_equals_one_process_and_the_unchunked_record(members):
    tmp, runs, rec = members
    overrides = [f"data.args.record={rec}", f"data.args.hop={HOP}"]
    proc = run_ranks(2, ["-m", "caldera.cli", "predict", *map(str, runs), "--split", "all", "--out",
                         str(tmp / "two.npy"), *(a for o in overrides for a in ("--set", o))])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp / "two.json").read_text())["ranks"] == 2
    predict(runs, "all", overrides, out=tmp / "one.npy", progress=False)
    two, one = np.load(tmp / "two.npy"), np.load(tmp / "one.npy")
    np.testing.assert_allclose(two, one, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp / "two.std.npy"), np.load(tmp / "one.std.npy"), atol=1e-5)
    assert (
        two.shape == (len(np.load(rec)) // HOP + 1, 2, HOP // 16) and np.load(tmp / "one.std.npy").max() > 0
    )
    # The whole record whitened at once and scanned by each member in one pass: the chunked scan, everywhere.
    samples = len(np.load(rec))
    t, stat = chirp.scan_series(two, samples, HOP)
    whitened = signal.oaconvolve(np.load(rec).astype(np.float64), chirp.whiten_filter(), mode="valid")
    k = len(stat)
    x = torch.from_numpy(whitened[: chirp.WINDOW - 1 + 16 * k].astype(np.float32))[None, None]
    nets = [load_run_model(RunDir(r), load_config(RunDir(r).read_config())).eval() for r in runs]
    with torch.no_grad():
        logits = torch.stack([net(x)[0] for net in nets]).mean(0).numpy()
        # ... and each window alone (the classifier as trained) gives its position's logits: around a boundary
        alone = torch.stack([net(x[..., p * 16 : p * 16 + chirp.WINDOW]) for p in (126, 127, 128, 129)
                             for net in nets]).reshape(4, 2, 2).mean(1).numpy()  # fmt: skip
    np.testing.assert_allclose(stat, logits[1] - logits[0], atol=1e-4)
    np.testing.assert_allclose(alone[:, 1] - alone[:, 0], stat[126:130], atol=1e-4)
    # Every injection found near its merger time, nothing else as loud as the weakest of them.
    inj = chirp.read_catalogue(rec)
    result = chirp.evaluate(*chirp.triggers(t, stat, 0.0), inj, samples / chirp.FS, far_per_day=0.0)
    assert result["found"] == len(inj) and result["false_alarms"] == 0, result
    # chirp_eval.py's seeds: each member scanned alone (`caldera predict RUN`), their mean is the ensemble's scan,
    # and several scans scored alone give mean ± sd with every scan's count.
    spec = importlib.util.spec_from_file_location("chirp_eval", ROOT / "examples" / "chirp_eval.py")
    chirp_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chirp_eval)
    alone = [tmp / f"member{i}.npy" for i in range(len(runs))]
    for run, out in zip(runs, alone):
        predict([run], "all", overrides, out=out, progress=False)
    np.testing.assert_allclose(chirp_eval.ensemble_scan(alone), one, atol=1e-5)
    scored = []
    for path in alone:
        t, stat = chirp.scan_series(np.load(path), samples, HOP)
        scored.append(chirp.evaluate(*chirp.triggers(t, stat, 0.0), inj, samples / chirp.FS, far_per_day=0.0))
        scored[-1]["snr50"] = chirp_eval.snr50(scored[-1]["by_snr"])
    both = chirp_eval.summary(scored)
    counts = [r["found"] for r in scored]
    assert both["found"]["values"] == counts
    assert both["found"]["mean"] == pytest.approx(statistics.fmean(counts))
    assert both["found"]["sd"] == pytest.approx(statistics.stdev(counts))
    assert both["scans"] == 2 and both["by_snr"][5]["found"]["values"] == [
        r["by_snr"][5]["found"] for r in scored
    ]
    # Half found between two bins' centres (SNR 5 and 7 here): where the line between them crosses 50 %.
    rows = [{"snr": [lo, lo + 2.0], "injected": 4, "efficiency": e} for lo, e in ((4.0, 0.25), (6.0, 0.75))]
    assert chirp_eval.snr50(rows) == 6.0 and np.isnan(chirp_eval.snr50(rows[:1]))
    results = {"injections": len(inj), "matched_filter": result, "cnn_ensemble": result, "cnn_single": both}
    assert f"| all | {len(inj)} | " in chirp_eval.table(results) and "one CNN, mean ± sd of 2 found" in (
        chirp_eval.table(results)
    )
