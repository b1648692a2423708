"""``caldera bench``: real quick runs to a quality target, the olympic mean, the result file, --compare, bad input."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from caldera.bench import WORKLOADS, olympic_mean
from caldera.cli import main
from tests.conftest import run_ranks


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine two threads per process spin against each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_bench_stops_at_the_target_and_compares(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "digits", "--quick", "--runs", "3", "--out", "a.json", "--dir", "runs"]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    entry, w = a["workloads"]["digits"], WORKLOADS["digits"]
    assert (
        a["quick"] and a["ranks"] == 1 and entry["target"] == w.quick_target and entry["metric"] == w.metric
    )
    assert [r["seed"] for r in entry["runs"]] == [0, 1, 2]
    for run in entry["runs"]:
        values = [value for _, value, _ in run["curve"]]
        assert run["epochs"] == len(values) and [e for e, _, _ in run["curve"]] == list(
            range(1, len(values) + 1)
        )
        if run[
            "reached"
        ]:  # stopped at the first epoch that met the target: the last value meets it, none before
            assert values[-1] >= w.quick_target and all(v < w.quick_target for v in values[:-1])
            assert run["seconds"] == run["curve"][-1][2] > 0 and run["setup_seconds"] >= 0
        else:  # ran every epoch the run file allows
            assert run["seconds"] is None and run["epochs"] == entry["max_epochs"]
    assert any(
        run["epochs"] > 1 for run in entry["runs"]
    )  # the quick target is not met by the first epoch alone
    times = [r["seconds"] for r in entry["runs"]]
    if all(t is not None for t in times):
        assert entry["time_to_quality_s"] == pytest.approx(sorted(times)[1])  # 3 runs: the middle one remains
    assert entry["failures"] == sum(t is None for t in times)
    system = a["system"]
    assert (
        system["cores"] >= 1 and system["torch"] == torch.__version__ and system["cpu"] and system["caldera"]
    )
    out = capsys.readouterr().out
    assert "bench digits run 3/3 seed 2" in out and "bench: wrote a.json" in out

    # A second result (one run: a plain mean, said so), then the table with the ratio of the two.
    assert (
        main(["bench", "digits", "--quick", "--runs", "1", "--seed", "7", "--out", "b.json", "--dir", "runs"])
        == 0
    )
    b = json.loads((tmp_path / "b.json").read_text())
    eb = b["workloads"]["digits"]
    assert "fewer than 3" in eb["method"] and eb["time_to_quality_s"] == eb["runs"][0]["seconds"]
    capsys.readouterr()
    assert main(["bench", "--compare", "a.json", "b.json"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| digits"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"val_accuracy >= {w.quick_target:g}"
    if entry["time_to_quality_s"] and eb["time_to_quality_s"]:
        assert cells[4] == f"{eb['time_to_quality_s'] / entry['time_to_quality_s']:.2f}x"
    assert "| workload | target | a.json (s) | b.json (s) | b.json / a.json |" in table


def test_olympic_mean_drops_the_fastest_and_the_slowest():
    assert olympic_mean([5.0, 1.0, 3.0, 4.0, 100.0]) == (
        pytest.approx(4.0),
        "olympic mean (fastest and slowest dropped)",
    )
    assert olympic_mean([2.0, None, 4.0, 3.0])[0] == pytest.approx(3.5)  # one failure: dropped as the slowest
    assert olympic_mean([2.0, None, None, 3.0])[0] is None  # two: no result
    assert olympic_mean([2.0, 4.0])[0] == statistics.mean([2.0, 4.0]) and olympic_mean([2.0, None])[0] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "nope"], "unknown workload 'nope'; choose from heat, climate"),
        (["bench", "digits", "--target", "digits=fast"], "'fast' is not a finite number"),
        (["bench", "digits", "--target", "digits=nan"], "'nan' is not a finite number"),
        (["bench", "digits", "--target", "heat=0.1"], "that workload is not in this bench run"),
        (["bench", "digits", "--runs", "0"], "give at least 1"),
        (["bench", "--compare", "missing.json"], "cannot read missing.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out", "x.json"] if "--compare" not in args else args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.json").exists()  # nothing ran, nothing written


@pytest.mark.mpi
def test_bench_under_two_ranks_stops_every_rank_together_and_prints_once(tmp_path):
    out = tmp_path / "mpi.json"
    proc = run_ranks(2, ["-m", "caldera", "bench", "heat", "--quick", "--runs", "1", "--out", str(out),
                         "--dir", str(tmp_path / "runs"), "--set", "parallel.strategy=allreduce"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("bench heat run 1/1 seed 0") == 1  # rank 0 reports, the other rank trains
    result = json.loads(out.read_text())
    run = result["workloads"]["heat"]["runs"][0]
    assert result["ranks"] == 2 and run["reached"] and run["curve"][-1][1] <= WORKLOADS["heat"].quick_target
