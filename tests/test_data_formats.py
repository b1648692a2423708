"""Scientific formats: each reader returns what the file's own library returns; layouts, statistics, prefetch."""

import json
import os
import time

import numpy as np
import pytest
import torch

from caldera.data import formats, normalize, prefetch, scientific
from caldera.data.formats import DataError, open_reader

RNG = np.random.default_rng(0)
T = RNG.normal(size=(37, 6, 5)).astype(np.float32)  # 37 records of a 6x5 field
K = RNG.uniform(1, 2, size=(37, 3, 6, 5))  # float64 field with 3 channels
LABEL = np.arange(37) % 4
ORDER = [30, 2, 2, 11, 36, 0, 17, 18, 19, 3]  # unsorted, a repeat, a contiguous run, both ends


def write_hdf5(path, chunks=(4,)):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        f.create_dataset("fields/T", data=T, chunks=(*chunks, 6, 5), compression="gzip")
        f.create_dataset("k", data=K, chunks=(5, 3, 6, 5))
        f.create_dataset("label", data=LABEL)  # contiguous
    return path


def write_netcdf(path):
    netCDF4 = pytest.importorskip("netCDF4")
    with netCDF4.Dataset(path, "w") as f:
        f.createDimension("time", None)
        f.createDimension("y", 6)
        f.createDimension("x", 5)
        f.createVariable("time", "f8", ("time",))[:] = np.arange(37) * 0.5
        f.createVariable("T", "f4", ("time", "y", "x"), chunksizes=(4, 6, 5))[:] = T
        # Packed int16 with a fill value: the library decodes it to floats with NaN where missing.
        packed = f.createVariable("p", "i2", ("time", "y", "x"), fill_value=-999, chunksizes=(4, 6, 5))
        packed.scale_factor, packed.add_offset = 0.01, 5.0
        values = np.round(T * 100) / 100
        values[3, 2, 1] = np.nan
        packed[:] = np.ma.array(np.nan_to_num(values) + 5.0, mask=np.isnan(values))
    return path


def write_zarr(path):
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(path), mode="w")
    create = group.create_array if hasattr(group, "create_array") else group.create_dataset
    create("T", shape=T.shape, chunks=(4, 6, 5), dtype="f4")[:] = T
    create("k", shape=K.shape, chunks=(7, 3, 6, 5), dtype="f8")[:] = K
    return path


def write_npy(directory):
    directory.mkdir()
    np.save(directory / "T.npy", T)
    np.save(directory / "k.npy", K)
    return directory


# -- each format reads the same values as its own library ---------------------------------------------------------


def test_hdf5_matches_h5py(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = write_hdf5(tmp_path / "f.h5")
    reader = open_reader(path)
    assert reader.variables == ["fields/T", "k", "label"] and len(reader) == 37
    got = reader.read(ORDER)
    with h5py.File(path, "r") as f:
        for var in reader.variables:
            np.testing.assert_array_equal(got[var], f[var][:][ORDER])
            assert got[var].dtype == f[var].dtype
        assert reader.shape("k") == f["k"].shape[1:]
    assert reader.chunk_records == 5  # k has the largest records: its chunks set the shuffle unit


def test_netcdf_matches_netcdf4_and_xarray(tmp_path):
    netCDF4 = pytest.importorskip("netCDF4")
    xr = pytest.importorskip("xarray")
    path = write_netcdf(tmp_path / "f.nc")
    reader = open_reader(path)
    assert reader.variables == ["T", "p"]  # the coordinate variable "time" is not data
    got = reader.read(ORDER)
    with netCDF4.Dataset(path) as f:
        np.testing.assert_array_equal(got["T"], f["T"][:][ORDER])
    with xr.open_dataset(path) as ds:
        np.testing.assert_array_equal(got["T"], ds["T"].values[ORDER])
        np.testing.assert_allclose(got["p"], ds["p"].values[ORDER], rtol=1e-6, equal_nan=True)
    assert np.isnan(reader.read([3])["p"][0, 2, 1])
    assert reader.chunk_records == 4


def test_netcdf_without_netcdf4_uses_h5netcdf_and_decodes_the_same(tmp_path, monkeypatch):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    path = write_netcdf(tmp_path / "f.nc")
    monkeypatch.setitem(__import__("sys").modules, "netCDF4", None)  # import netCDF4 now fails
    reader = open_reader(path, variables=["T", "p"])
    got = reader.read(ORDER)
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        np.testing.assert_array_equal(got["T"], ds["T"].values[ORDER])
        np.testing.assert_allclose(got["p"], ds["p"].values[ORDER], rtol=1e-6, equal_nan=True)


def test_zarr_matches_zarr(tmp_path):
    zarr = pytest.importorskip("zarr")
    path = write_zarr(tmp_path / "f.zarr")
    reader = open_reader(path)
    got = reader.read(ORDER)
    group = zarr.open_group(str(path), mode="r")
    for var in ("T", "k"):
        np.testing.assert_array_equal(got[var], group[var][:][ORDER])
    assert reader.chunk_records == 7


def test_a_zarr_store_naming_the_pickle_codec_is_refused_unread(tmp_path):
    # The pickle codec unpickles each chunk when read (code from the file) with an older numcodecs; refuse the
    # store by its metadata, whatever zarr/numcodecs version would do with it.
    path = write_zarr(tmp_path / "f.zarr")
    meta = next(p for p in (path / "T" / "zarr.json", path / "T" / ".zarray") if p.exists())
    doc = json.loads(meta.read_text())
    if "codecs" in doc:
        doc["codecs"].append({"name": "numcodecs.pickle", "configuration": {"protocol": 5}})
    else:
        doc["filters"] = [{"id": "pickle", "protocol": 5}]
    meta.write_text(json.dumps(doc))
    with pytest.raises(
        DataError, match=r"T/(zarr\.json|\.zarray): the Zarr store asks for the 'pickle' codec"
    ):
        open_reader(path)


def test_npy_matches_numpy_memmap(tmp_path):
    directory = write_npy(tmp_path / "arrays")
    reader = open_reader(directory)
    assert reader.format == "npy" and sorted(reader.variables) == ["T", "k"]
    got = reader.read(ORDER, ["k"])
    np.testing.assert_array_equal(got["k"], np.load(directory / "k.npy", mmap_mode="r")[ORDER])
    single = open_reader(directory / "T.npy")
    np.testing.assert_array_equal(single.read(ORDER)["T"], T[ORDER])


def test_each_chunk_is_read_once_per_batch():
    class Counting:
        shape, dtype = (100, 2), np.dtype("f8")

        def __init__(self):
            self.data, self.calls = np.arange(200.0).reshape(100, 2), []

        def __getitem__(self, key):
            self.calls.append((key.start, key.stop))
            return self.data[key]

    arr = Counting()
    reader = object.__new__(formats._Reader)  # the shared read path, over an in-memory array
    reader.__dict__.update(path="mem", variables=["a"], _length=100, _lock=formats.threading.Lock(),
                           _array=lambda v: arr, _chunk=lambda v: 10, dense_chunks=True)  # fmt: skip
    idx = [55, 12, 18, 51, 10, 59, 93]
    np.testing.assert_array_equal(reader.read(idx)["a"], arr.data[idx])
    assert arr.calls == [(10, 19), (51, 60), (93, 94)]  # one span per chunk touched: chunks 1, 5, 9


# -- clear errors ------------------------------------------------------------------------------------------------


def test_missing_file_variable_and_mismatches_name_what_is_wrong(tmp_path):
    pytest.importorskip("h5py")
    with pytest.raises(DataError, match="nope.h5.*does not exist"):
        open_reader(tmp_path / "nope.h5")
    path = write_hdf5(tmp_path / "f.h5")
    with pytest.raises(DataError, match=r"'fields/t'.*f\.h5.*Did you mean 'fields/T'"):
        open_reader(path, variables=["fields/t"])
    with pytest.raises(DataError, match="unknown data format 'hfd5'; did you mean 'hdf5'"):
        open_reader(path, format="hfd5")
    with pytest.raises(DataError, match="cannot tell the format"):
        open_reader(tmp_path)

    import h5py

    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["a"], f["b"] = np.zeros((10, 4, 4)), np.zeros((9, 4, 4))
        f["c"] = np.zeros((10, 3, 3))
    with pytest.raises(DataError, match=r"'a' has 10, 'b' has 9"):
        open_reader(tmp_path / "bad.h5", variables=["a", "b"])
    with pytest.raises(DataError, match=r"differ in their grid: 'a' \(4, 4\), 'c' \(3, 3\)"):
        scientific.dataset(str(tmp_path / "bad.h5"), inputs=["a"], targets=["c"], normalize=False)
    with pytest.raises(DataError, match="out of range"):
        open_reader(path).read([37])
    with pytest.raises(DataError, match="window=0"):
        scientific.dataset(str(path), inputs="k", window=0, normalize=False)
    with pytest.raises(DataError, match="backend = 'gpu'"):
        scientific.dataset(str(path), inputs="k", backend="gpu", normalize=False)
    with pytest.raises(DataError, match="too few for window=40"):
        scientific.dataset(str(path), inputs="k", window=40, normalize=False)
    with pytest.raises(DataError, match=r"patch=\[7, 2\] does not fit"):
        scientific.dataset(str(path), inputs="k", patch=[7, 2], normalize=False)


# -- layouts: variables as channels, windows, patches -----------------------------------------------------------


def test_inputs_stack_as_channels_and_scalar_targets_are_labels(tmp_path):
    path = write_hdf5(tmp_path / "f.h5")
    data = scientific.dataset(str(path), inputs=["fields/T", "k"], targets=["label"], normalize=False,
                              val_fraction=0.2)  # fmt: skip
    train, val = data["train"], data["val"]
    assert (len(train), len(val)) == (30, 7)  # validation is the last 20 % of records
    x, y = train.read_batch([4, 1])
    expected = np.concatenate([T[[4, 1], None], K[[4, 1]]], axis=1).astype(np.float32)
    np.testing.assert_array_equal(x, expected)
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.tolist() == LABEL[[4, 1]].tolist()
    xv, _ = val[0]
    np.testing.assert_array_equal(xv[0].numpy(), T[30])


def test_windows_and_patches_slice_the_records(tmp_path):
    path = write_hdf5(tmp_path / "f.h5")
    ds = scientific.dataset(str(path), inputs=["fields/T"], targets=["fields/T"], window=3, lead=2, stride=2,
                            patch=[3, 2], patch_stride=[3, 1], normalize=False, val_fraction=0.0)["train"]  # fmt: skip
    corners = [(0, 0), (0, 1), (0, 2), (0, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    starts = range(0, 37 - 3 - 2 + 1, 2)
    assert len(ds) == len(starts) * len(corners)
    for i in [0, 5, 9, len(ds) - 1]:
        s, (oy, ox) = starts[i // len(corners)], corners[i % len(corners)]
        x, y = ds[i]
        np.testing.assert_array_equal(x.numpy(), T[s : s + 3, oy : oy + 3, ox : ox + 2])
        np.testing.assert_array_equal(y.numpy(), T[s + 4, None, oy : oy + 3, ox : ox + 2])


# -- normalisation ----------------------------------------------------------------------------------------------


def test_statistics_match_numpy_and_are_kept_with_the_run(tmp_path, monkeypatch):
    path = write_hdf5(tmp_path / "f.h5")
    run = tmp_path / "run"
    ds = scientific.dataset(str(path), inputs=["fields/T", "k"], targets=["label"], run_dir=run,
                            val_fraction=0.25)["train"]  # fmt: skip
    n_train = 37 - int(37 * 0.25)
    for var, ref in (("fields/T", T[:n_train]), ("k", K[:n_train])):
        assert ds.stats[var].mean == pytest.approx(ref.astype(np.float64).mean(), rel=1e-12)
        assert ds.stats[var].std == pytest.approx(ref.astype(np.float64).std(), rel=1e-12)
    assert "label" not in ds.stats  # integer labels are not normalised
    x, _ = ds.read_batch([3])
    expected = (T[3] - T[:n_train].astype(np.float64).mean()) / T[:n_train].astype(np.float64).std()
    np.testing.assert_allclose(x[0, 0], expected, rtol=1e-5, atol=1e-6)
    saved = json.loads((run / "normalization.json").read_text())
    assert saved["variables"]["k"]["mean"] == ds.stats["k"].mean and saved["source"]["records"] == [
        0,
        n_train,
    ]

    def fail(*a, **k):
        raise AssertionError("statistics were recomputed instead of read from the run directory")

    monkeypatch.setattr(normalize, "compute_stats", fail)
    again = scientific.dataset(str(path), inputs=["fields/T", "k"], targets=["label"], run_dir=run,
                               val_fraction=0.25)["train"]  # fmt: skip
    assert again.stats == ds.stats


def test_statistics_skip_missing_values_and_merge_exactly(tmp_path):
    values = RNG.normal(1e4, 1.0, size=(50, 8))  # a large offset: naive sum of squares loses precision
    values[7, 3] = np.nan
    np.save(tmp_path / "v.npy", values)
    reader = open_reader(tmp_path / "v.npy")
    stats = normalize.compute_stats(reader, batch_bytes=64)  # many small batches merged
    finite = values[np.isfinite(values)]
    assert stats["v"].count == finite.size
    assert stats["v"].mean == pytest.approx(finite.mean(), rel=1e-14)
    assert stats["v"].std == pytest.approx(finite.std(), rel=1e-9)
    # Rank blocks cover the records exactly once, cut on chunk boundaries.
    blocks = [normalize.rank_block(0, 103, r, 3, 8) for r in range(3)]
    assert (
        blocks[0][0] == 0 and blocks[-1][1] == 103 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    )
    assert all(lo % 8 == 0 for lo, _ in blocks)


# -- batches, prefetch, stall statistics -------------------------------------------------------------------------


def crop_and_log(x, y, rng):
    """A random transform: crop a random 4x4 window of every sample, take log of the k channels."""
    oy, ox = rng.integers(0, 3), rng.integers(0, 2)
    x = x[..., oy : oy + 4, ox : ox + 4].copy()
    x[:, 1:] = np.log(x[:, 1:])
    return x, y


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_prefetched_batches_equal_direct_reads(tmp_path, backend):
    path = write_hdf5(tmp_path / "f.h5")
    ds = scientific.dataset(str(path), inputs=["fields/T", "k"], targets=["label"], normalize=False,
                            transform=crop_and_log, backend=backend, val_fraction=0.0)["train"]  # fmt: skip
    batches = ds.batches(8, seed=4, num_workers=2)
    batches.set_epoch(1)
    got = list(batches)
    batches.close()
    plan = ChunkPlan(ds, 8, seed=4, epoch=1)
    assert [n for _, n, _ in got] == [len(idx) for idx, _ in plan]
    for (k, (idx, _)), ((x, y), _, _) in zip(enumerate(plan), got):
        ref_x, ref_y = ds.read_batch(idx, np.random.default_rng([4, 1, k, 0]))
        np.testing.assert_array_equal(x.numpy(), ref_x)
        np.testing.assert_array_equal(y.numpy(), ref_y)
    assert sorted(torch.cat([y for (_, y), _, _ in got]).tolist()) == sorted(LABEL.tolist())


def ChunkPlan(ds, batch, seed, epoch):
    from caldera.data.shuffle import ChunkShuffleSampler

    s = ChunkShuffleSampler(len(ds), batch, chunk=ds.chunk_samples, seed=seed)
    s.set_epoch(epoch)
    return list(s)


def test_existing_sharded_batches_read_whole_batches_through_getitems(tmp_path):
    from caldera.data.sampler import ShardedBatches

    path = write_hdf5(tmp_path / "f.h5")
    ds = scientific.dataset(str(path), inputs=["k"], targets=["label"], normalize=False, val_fraction=0)[
        "train"
    ]
    reads = []
    original = ds.read_batch
    ds.read_batch = lambda idx, rng=None: reads.append(list(idx)) or original(idx, rng)
    batches = ShardedBatches(ds, 10, seed=1)
    for ((x, y), _, _), (idx, _) in zip(batches, batches.plan()):
        np.testing.assert_array_equal(x.numpy(), K[idx.numpy()].astype(np.float32))
        assert y.tolist() == LABEL[idx.numpy()].tolist()
    assert len(reads) == len(batches)  # one read per batch, not one per sample


def test_worker_errors_reach_the_training_loop():
    def load(job):
        if job == 2:
            raise DataError("variable 'T' in f.h5: broken record")
        return np.full(3, job)

    for backend in ("thread", "process"):
        out = prefetch.Prefetcher(load, workers=2, backend=backend)(range(5))
        assert next(out).tolist() == [0, 0, 0] and next(out).tolist() == [1, 1, 1]
        with pytest.raises(DataError) as raised:
            next(out)
        assert str(raised.value) == "variable 'T' in f.h5: broken record", backend  # its words, one line


def test_meter_measures_an_input_bound_loop_and_advises():
    def slow_source():
        for i in range(6):
            time.sleep(0.02)  # reading is slower than the "model" below
            yield i

    meter = prefetch.InputMeter()
    for _ in meter.wrap(slow_source()):
        time.sleep(0.002)
    stats = meter.stats
    assert stats.steps == 6 and stats.wait_fraction > 0.7
    advice = prefetch.input_advice(stats, num_workers=0, backend="thread", chunk_records=1)
    assert "input-bound" in advice and "[data] num_workers" in advice and "1 record(s) per chunk" in advice

    # The same source behind a prefetcher: the loop no longer waits.
    fetched = prefetch.Prefetcher(lambda i: np.array([i]), workers=2, depth=6)(range(6))
    for _ in meter.wrap(fetched):
        time.sleep(0.02)
    assert meter.stats.wait_fraction < 0.05
    assert prefetch.input_advice(meter.stats) is None


def test_worker_processes_start_safely_under_mpi(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mpi4py.MPI", object())
    assert prefetch.worker_context() == "forkserver"
    monkeypatch.delitem(__import__("sys").modules, "mpi4py.MPI")
    assert prefetch.worker_context() is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_is_not_locked_out_by_a_parent_thread_mid_read():
    import threading

    held, release = threading.Event(), threading.Event()

    def reader_thread():  # a thread worker in the middle of a read when the process forks
        with formats._LIBRARY_LOCK:
            held.set()
            release.wait()

    threading.Thread(target=reader_thread, daemon=True).start()
    held.wait()
    pid = os.fork()
    if pid == 0:  # the child: its reads must not wait forever for a lock no thread of its own holds
        os._exit(0 if formats._LIBRARY_LOCK.acquire(timeout=5) else 3)
    _, status = os.waitpid(pid, 0)
    release.set()
    assert os.waitstatus_to_exitcode(status) == 0


# -- damaged files and missing values (issue 17, item 9) ----------------------------------------------------------


def read_everything(path):
    reader = open_reader(path)
    try:
        for var in reader.variables:
            reader.read(np.arange(len(reader)), [var])
    finally:
        reader.close()


def test_damaged_hdf5_and_netcdf_files_are_a_data_error_naming_the_file(tmp_path):
    blob = write_hdf5(tmp_path / "good.h5").read_bytes()
    nc = write_netcdf(tmp_path / "good.nc").read_bytes()
    damaged = {"truncated.h5": blob[: len(blob) // 2], "random.h5": RNG.bytes(4096), "empty.h5": b"",
               "truncated.nc": nc[: len(nc) // 2], "random.nc": RNG.bytes(2048),
               "header-only.nc": b"CDF\x01" + RNG.bytes(500)}  # fmt: skip
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(
            DataError, match=f"file '.*{name}' cannot be read .*copy it again or regenerate it"
        ):
            read_everything(tmp_path / name)
    # Bit flips all over the file (header, B-trees, compressed chunks): each one either still reads (a flip in
    # raw data or padding that HDF5 cannot see) or is a DataError; none may escape as another exception.
    outcomes = {"read": 0, "DataError": 0}
    for i in range(0, len(blob), 101):
        flipped = bytearray(blob)
        flipped[i] ^= 0xFF
        (tmp_path / "flip.h5").write_bytes(flipped)
        try:
            read_everything(tmp_path / "flip.h5")
            outcomes["read"] += 1
        except DataError as exc:
            assert "flip.h5" in str(exc)
            outcomes["DataError"] += 1
    assert outcomes["DataError"] > 30, outcomes


def write_with_nan(path, record, value=np.nan):
    h5py = pytest.importorskip("h5py")
    values = T.copy()
    values[record, 2, 3] = value
    with h5py.File(path, "w") as f:
        f.create_dataset("T", data=values, chunks=(4, 6, 5))
        f.create_dataset("label", data=LABEL)
    return path


def test_nan_and_inf_in_the_data_are_named_before_training(tmp_path):
    # In a training record: the statistics pass counts finite values anyway, so it is known before any batch.
    path = write_with_nan(tmp_path / "train_nan.h5", record=5)
    with pytest.raises(
        DataError, match=r"variable 'T' in .*train_nan.h5 holds 1 NaN/Inf values .*records 0\.\.28"
    ):
        scientific.dataset(str(path), inputs="T", targets="label", val_fraction=0.25)
    # In a validation record (no statistics there) or without normalisation: found when that batch is read.
    path = write_with_nan(tmp_path / "val_inf.h5", record=33, value=np.inf)
    val = scientific.dataset(str(path), inputs="T", targets="label", val_fraction=0.25)["val"]
    with pytest.raises(
        DataError, match=r"variable 'T' in .*val_inf.h5 holds 1 NaN/Inf values in records 33;"
    ):
        val.read_batch(np.arange(len(val)))
    raw = scientific.dataset(str(path), inputs="T", targets="label", normalize=False, val_fraction=0)["train"]
    with pytest.raises(DataError, match=r"records 33; fix the file, or set \[data\] args.missing"):
        raw.read_batch([30, 33])
    # missing = a number fills after normalisation; 'keep' hands them to a transform.
    filled = scientific.dataset(str(path), inputs="T", targets="label", val_fraction=0.25, missing=0.0)["val"]
    x, _ = filled.read_batch([33 - 28])
    assert np.isfinite(x).all() and x[0, 0, 2, 3] == 0.0
    kept = scientific.dataset(str(path), inputs="T", targets="label", val_fraction=0.25, missing="keep")[
        "val"
    ]
    assert np.isinf(kept.read_batch([33 - 28])[0][0, 0, 2, 3])
    with pytest.raises(DataError, match="missing = 'drop'"):
        scientific.dataset(str(path), inputs="T", missing="drop")
