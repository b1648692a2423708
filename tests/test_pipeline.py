"""Pipeline parallelism: stages on real ranks equal one process on the whole batch; stage splits; clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import caldera
from caldera.parallel.pipeline import Pipeline, schedule_order, stage_bounds
from tests.conftest import run_ranks


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("ranks", "schedule", "stages", "peaks", "precision"),
    # GPipe holds every micro-batch's activations; 1F1B at most (stages - stage); 2 x 2: two replicas of 2 stages.
    [(2, "gpipe", 2, [3, 3], "fp32"), (3, "1f1b", 3, [3, 2, 1], "fp32"), (4, "1f1b", 2, [2, 1, 2, 1], "fp32"),
     (2, "1f1b", 2, [2, 1], "fp16")],
)  # fmt: skip
def test_stages_on_ranks_train_like_one_process_on_the_whole_batch(tmp_path, ranks, schedule, stages, peaks,
                                                                   precision):  # fmt: skip
    # Momentum SGD, a gradient-norm clip (the norm spans every stage), 3 micro-batches, an uneven last batch.
    # fp16: a loss scale so large that some steps overflow on some stage; every stage must skip those steps and
    # lower the scale together, exactly as one process running the same micro-batches does.
    script = [
        "tests/scripts/pipeline_equivalence.py",
        str(tmp_path / "run"),
        schedule,
        str(stages),
        precision,
    ]
    proc = run_ranks(ranks, script, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["size"] == ranks and out["max_diff"] < 1e-5, out
    if precision == "fp16":
        assert all(sc == out["ref_scaler"] for sc in out["scaler"]) and out["ref_scaler"]["skipped"] > 0, out
    assert out["spread"] == 0.0, out  # after training every rank holds the whole, identical model
    assert out["val_loss"] == pytest.approx(out["ref_val_loss"], abs=1e-5)
    assert out["train_loss"] == pytest.approx(out["ref_train_loss"], abs=1e-5)
    assert out["momentum_everywhere"] and out["saved_whole"], out  # checkpoints hold every stage's state
    assert out["peaks"] == peaks, out  # micro-batches whose activations each rank held at once
    # Training holds one stage's weights and optimizer state per rank; checkpoints and the final model the whole.
    assert out["released"] == [True] * ranks and out["restored"] == [True] * ranks, out
    assert sum(out["held"]) == 2499 * ranks // stages, out  # the stages of each replica add up to one model
    # Validation runs through the stages: only the last stage of each pipeline scores, holding its stage alone.
    last = [r for r in range(ranks) if r % stages == stages - 1]
    assert [bool(v) for v in out["held_at_validation"]] == [r in last for r in range(ranks)], out
    assert all(out["held_at_validation"][r] == [out["held"][r]] for r in last), out


def test_1f1b_order_runs_each_micro_batch_forward_before_backward_with_bounded_memory():
    for stages in (1, 2, 4):
        for stage in range(stages):
            for m in (1, 3, 8):
                order = schedule_order("1f1b", stage, stages, m)
                assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                held, peak = set(), 0
                for kind, i in order:
                    held.add(i) if kind == "F" else held.remove(i)  # a backward only after its forward
                    peak = max(peak, len(held))
                assert peak == min(m, stages - stage)


def test_stages_balance_parameters_or_follow_the_given_split():
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10), nn.ReLU(), nn.Linear(10, 10))
    assert stage_bounds(model, 2) == [(0, 1), (1, 5)]  # the big first layer alone, the small rest together
    assert stage_bounds(model, 5) == [(i, i + 1) for i in range(5)]
    assert stage_bounds(model, 2, [3, 2]) == [(0, 3), (3, 5)]
    assert stage_bounds(model, 1) == [(0, 5)]
    # The heaviest stage as light as it can be (a greedy cut would give the middle stage one ReLU and nothing else).
    seven = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 3))  # fmt: skip
    assert stage_bounds(seven, 3) == [(0, 2), (2, 4), (4, 7)]  # 288 / 1056 / 1155 parameters
    with pytest.raises(ValueError, match="6 pipeline stages for a model of 5 layers"):
        stage_bounds(model, 6)
    with pytest.raises(ValueError, match=r"balance = \[4, 2\] must give each of the 2 stages >= 1 layer, 5"):
        stage_bounds(model, 2, [4, 2])


def test_replicas_of_a_pipeline_share_the_batch_and_a_bad_stage_count_is_named():
    assert Pipeline(stages=2).data_shards(caldera.World(rank=3, size=4)) == (1, 2)  # replica 1 of 2
    assert Pipeline().data_shards(caldera.World(rank=2, size=3)) == (0, 1)  # one pipeline: one shared batch
    with pytest.raises(ValueError, match=r"stages = 2 must divide the 3 ranks \(ranks = replicas x stages\)"):
        Pipeline(stages=2).data_shards(caldera.World(rank=0, size=3))


def test_a_model_that_is_not_sequential_is_refused_with_the_fix():
    model = nn.Module()
    with pytest.raises(ValueError, match="splits an nn.Sequential into stages; Module is not one"):
        Pipeline().setup(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), caldera.init())


@pytest.mark.mpi
def test_the_cli_trains_the_example_in_stages_resumes_it_and_refuses_a_model_it_cannot_split(
    tmp_path, capsys
):
    run_dir = tmp_path / "digits"
    args = ["-m", "caldera.cli", "train", "examples/digits_pipeline.toml", "--set", f"run.dir={run_dir}",
            "--set", "optim.epochs=2", "--set", "train.plot=false"]  # fmt: skip
    stop = run_ranks(2, [*args, "--time-limit", "0"], timeout=120)  # checkpoint after the first step, exit 85
    assert stop.returncode == 85, stop.stderr[-3000:]
    assert "global batch 64 = 1 x 64, each slice shared by 2 ranks" in stop.stdout
    proc = run_ranks(
        2, [*args, "--resume"], timeout=120
    )  # every stage's weights and optimizer state come back
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "global step 1)" in proc.stdout, proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["final"]["val_accuracy"] > 0.8
    assert set(torch.load(run_dir / "model.pt")) == {
        f"{i}.{k}" for i in (1, 3, 5, 7) for k in ("weight", "bias")
    }
    from caldera.cli import main

    cnn = ["--set", "model.name=small_cnn", "--set", "model.args={}"]
    assert main([*args[2:], *cnn]) == 2  # refused before training: checked in this process
    assert "SmallCNN is not one" in capsys.readouterr().err
