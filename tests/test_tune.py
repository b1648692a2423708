"""caldera tune: trials handed out to real ranks as they come, failures recorded, mistakes caught before any
training."""

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import run_ranks

# One epoch of a narrow CNN per trial, over the learning rate only: a trial takes about a second.
FAST = ["--set", "optim.epochs=1", "--set", "model.args.channels=4",
        "--set", "tune.space={optim.lr: {low: 0.0003, high: 0.03, log: true}}"]  # fmt: skip


def tune_cmd(run_dir, *extra):
    return [
        "-m",
        "caldera.cli",
        "tune",
        "examples/digits_tune.toml",
        "--set",
        f"run.dir={run_dir}",
        *FAST,
        *extra,
    ]


def rows(run_dir):
    with open(run_dir / "tune" / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_one_process_runs_every_trial_records_a_failure_and_names_the_best(tmp_path):
    # A grid over three learning rates: 1e6 diverges (a NaN loss fails that trial), the search goes on.
    extra = ["--set", "tune.sampler=grid", "--set", "tune.space={optim.lr: [0.01, 1000000.0, 0.003]}",
             "--set", "optim.name=sgd", "--set", "tune.metric=val_accuracy", "--set", "tune.direction=maximize"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *tune_cmd(tmp_path, *extra)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {r["optim.lr"]: r for r in rows(tmp_path)}
    assert [r["trial"] for r in rows(tmp_path)] == ["0", "1", "2"]
    assert table["1000000.0"]["state"] == "failed" and "loss is" in table["1000000.0"]["error"]
    assert table["0.01"]["state"] == table["0.003"]["state"] == "complete"
    assert "(1 failed, 0 pruned)" in proc.stdout
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    done = [r for r in table.values() if r["state"] == "complete"]
    assert best["val_accuracy"] == max(float(r["value"]) for r in done)  # the metric is maximised
    assert (
        best["command"]
        == f"caldera train examples/digits_tune.toml --set optim.lr={best['params']['optim.lr']}"
    )
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 0
    for r in done:  # each trial is a whole run of its own
        assert (tmp_path / "trials" / f"trial-000{r['trial']}" / "metrics.jsonl").exists()


@pytest.mark.mpi
def test_ranks_take_trials_as_they_come_and_a_failing_one_is_reported(tmp_path):
    # Three trials (an odd count) on two ranks, one of which diverges: no rounds, so the ranks hand themselves
    # trials until three are out; the failed trial is recorded, the search reports its best and exits 0.
    extra = ["--set", "tune.sampler=grid", "--set", "tune.space={optim.lr: [0.01, 1000000.0, 0.003]}",
             "--set", "optim.name=sgd"]  # fmt: skip
    proc = run_ranks(2, tune_cmd(tmp_path, *extra), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rows(tmp_path)
    assert sorted(r["trial"] for r in table) == ["0", "1", "2"]
    assert {r["rank"] for r in table} == {"0", "1"}  # both ranks trained
    assert {r["optim.lr"]: r["state"] for r in table} == {"0.01": "complete", "1000000.0": "failed",
                                                           "0.003": "complete"}  # fmt: skip
    assert proc.stdout.count("best of 3 trials (1 failed, 0 pruned)") == 1  # only rank 0 reports


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--set", "tune.space={optim.learning_rate: [0.1]}"], "unknown key 'optim.learning_rate'"),
     (["--set", "tune.metric=val_f1"], "tune.metric = 'val_f1' is not a metric of this run")],
)  # fmt: skip
def test_mistakes_in_the_tune_section_are_one_clear_error(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, *tune_cmd(tmp_path, "--trials", "1", *extra)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_search_whose_every_trial_fails_says_so_once(tmp_path):
    extra = [
        "--set",
        "tune.sampler=grid",
        "--set",
        "tune.space={optim.lr: [1000000.0]}",
        "--set",
        "optim.name=sgd",
    ]
    proc = subprocess.run(
        [sys.executable, *tune_cmd(tmp_path, *extra)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert "all 1 trials failed; the first: NonFiniteLossError: loss is" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.mpi
def test_trials_on_a_generated_source_meet_no_other_rank(tmp_path):
    # Each trial writes its own image stack in its own directory. The data source once did its rank-0-writes,
    # others-wait on all ranks of the job: rank 1's trial waited for rank 0 to write *trial-0000*/phantoms.h5 and
    # then found no trial-0001/phantoms.h5, and in the partial round rank 0's write met rank 1's allgather, so
    # rank 1 crashed at the end. Now a trial's source works alone: three trials complete, the search reports.
    small = ["--set", "data.args={n: 12, size: 16, patch: [16, 16], patch_stride: [16, 16], dose_range: [2, 100]}",
             "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set", "model.args.channels=4",
             "--set", "optim.epochs=1", "--set", "optim.warmup_steps=0", "--set", "tune.metric=val_loss",
             "--set", "tune.space={optim.lr: {low: 0.0003, high: 0.03, log: true}}"]  # fmt: skip
    cmd = ["-m", "caldera.cli", "tune", "examples/imaging_denoise.toml", "--set", f"run.dir={tmp_path}", *small,
           "--trials", "3"]  # fmt: skip
    proc = run_ranks(2, cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rows(tmp_path)
    assert [(r["state"], r["error"]) for r in table] == [("complete", "")] * 3
    assert {r["rank"] for r in table} == {"0", "1"}
    for r in table:  # every trial made its own stack in its own directory
        assert (tmp_path / "trials" / f"trial-000{r['trial']}" / "phantoms.h5").stat().st_size > 0
    assert proc.stdout.count("best of 3 trials (0 failed, 0 pruned)") == 1


def test_objectives_and_pruner_settings_that_cannot_work_are_named():
    from caldera.config import ConfigError, load_config
    from caldera.tune.study import pruner

    def problem(*sets):
        with pytest.raises(ConfigError) as err:
            cfg = load_config("examples/digits_tune.toml", list(sets))
            pruner(cfg.tune, cfg.optim.epochs)
        return str(err.value)

    assert "2 metrics but 1 directions" in problem(
        "tune.metric=[val_loss, params]", "tune.direction=[minimize]"
    )
    assert "pruning needs a single metric" in problem("tune.metric=[val_loss, params]", "tune.pruner=median")
    assert "tune.pruner_args = {'bogus': 1}" in problem("tune.pruner=asha", "tune.pruner_args={bogus: 1}")
    cfg = load_config("examples/digits_tune.toml", ["tune.pruner=hyperband"])
    assert (
        pruner(cfg.tune, cfg.optim.epochs)._max_resource == cfg.optim.epochs
    )  # a trial's epochs are its resource
