"""Reach: optimizers and learning-rate schedulers by name or import path with their arguments (resumed exactly from a
checkpoint); a user's training step in place of loss_fn(model(x), y), under every strategy that computes the loss
itself, precision modes, gradient accumulation and resume."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from caldera.config import ConfigError, UntrustedCode, check_trusted, load_config
from caldera.data.sampler import ShardedBatches
from caldera.train.callbacks import Callback
from caldera.train.run import Stepped, build_data, build_model, build_optimizer, build_trainer, train
from caldera.train.trainer import Trainer
from caldera.world import SetupWarning, init, seed_everything
from tests.conftest import ROOT, run_ranks


def regression(n: int = 96, seed: int = 0) -> TensorDataset:
    """y = a fixed linear map of x plus noise: 4 inputs, 2 outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 2, generator=g) + 0.05 * torch.randn(n, 2, generator=g))


def config(run_dir, optim=None, train_=None, **extra):
    return load_config({
        "run": {"dir": str(run_dir)}, "model": {"name": "mlp", "args": {"sizes": [4, 8, 2]}},
        "data": {"source": "tests.test_reach:regression", "batch_size": 20, "val_fraction": 0.25},
        "optim": {"epochs": 3, **(optim or {})},
        "train": {"progress": False, "plot": False, **(train_ or {})},
        "checkpoint": {"every": 1, "keep": 50, "async_write": False}, **extra,
    })  # fmt: skip


class Crash(Callback):
    """Stop the process's training after ``at`` optimizer steps, as a kill would (the checkpoint of step ``at``
    is written after the step's callbacks, so the newest one on disk is of step ``at - 1``)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def fit(cfg, resume=False, crash_at=None):
    """What caldera.train.run.train does, with a crash inserted; return the trainer."""
    world = init(seed=cfg.run.seed)
    train_set, val_set = build_data(cfg, world.comm)
    seed_everything(cfg.run.seed)
    model = build_model(cfg)
    steps = len(ShardedBatches(train_set, cfg.data.batch_size, 0, 1))
    trainer = build_trainer(cfg, model, steps, world, resume=resume)
    if crash_at is not None:
        trainer.callbacks.append(Crash(crash_at))
    with contextlib.suppress(KeyboardInterrupt):
        trainer.fit(train_set, val_set)
    return trainer


def test_optimizers_and_schedulers_by_path_resume_exactly(tmp_path):
    # torch.optim's classes by built-in name or import path, with their own arguments.
    model = torch.nn.Linear(2, 2)
    radam = build_optimizer(config(tmp_path, {"name": "torch.optim:RAdam", "lr": 0.01,
                                              "args": {"betas": [0.8, 0.9]}}), model)  # fmt: skip
    assert type(radam) is torch.optim.RAdam and radam.defaults["betas"] == [0.8, 0.9]
    assert radam.defaults["lr"] == 0.01
    sgd = build_optimizer(config(tmp_path, {"name": "sgd"}), model)  # the built-in keeps its momentum
    assert sgd.defaults["momentum"] == 0.9
    assert type(build_optimizer(config(tmp_path, {"name": "rmsprop"}), model)) is torch.optim.RMSprop

    # A misspelt argument is one line naming the valid ones; so is a misspelt class and a scheduler needing a metric.
    with pytest.raises(ConfigError, match=r"\[optim\] args = \{'betaz'.*accepts: params, lr, betas"):
        build_optimizer(config(tmp_path, {"name": "torch.optim:RAdam", "args": {"betaz": [0.8, 0.9]}}), model)
    with pytest.raises(ConfigError, match="has no 'RAdm'. Did you mean 'torch.optim:RAdam'"):
        config(tmp_path, {"name": "torch.optim:RAdm"})
    with pytest.raises(ConfigError, match=r"step\(\) needs metrics"):
        fit(config(tmp_path, {"scheduler": "torch.optim.lr_scheduler:ReduceLROnPlateau"}))
    with pytest.raises(
        ConfigError, match=r"scheduler_args = .*'pct_strat'.*accepts: optimizer, max_lr, total_steps"
    ):
        fit(config(tmp_path, {"scheduler": "onecycle", "scheduler_args": {"pct_strat": 0.3}}))
    with pytest.raises(ConfigError, match="replaces schedule and warmup_steps"):
        config(tmp_path, {"scheduler": "onecycle", "schedule": "cosine"})
    with pytest.raises(ConfigError, match="async-ps's workers share no step count"):
        fit(config(tmp_path, {"scheduler": "onecycle"}, parallel={"strategy": "async-ps"}))

    # OneCycleLR: total_steps and max_lr filled in; 72 samples in batches of 20 are 4 steps an epoch (the last one
    # short), 12 in all, and the rates at the epochs' ends are OneCycleLR's after 4, 8 and 12 steps.
    onecycle = {"name": "torch.optim:RAdam", "lr": 0.05, "scheduler": "torch.optim.lr_scheduler:OneCycleLR",
                "scheduler_args": {"pct_start": 0.25}}  # fmt: skip
    whole = fit(config(tmp_path / "whole", onecycle))
    inner = whole.scheduler.scheduler
    assert isinstance(whole.scheduler, Stepped) and type(inner) is torch.optim.lr_scheduler.OneCycleLR
    assert inner.total_steps == 12 and inner.last_epoch == 12 and whole.global_step == 12
    lrs = [h["lr"] for h in whole.history]
    ref = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([torch.zeros(1)]), 0.05, 12, pct_start=0.25)
    expected = [
        [(ref.optimizer.step(), ref.step()) for _ in range(4)] and ref.get_last_lr()[0] for _ in range(3)
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)

    # Killed after step 7 and resumed: the same weights and rates as the unbroken run.
    fit(config(tmp_path / "broken", onecycle), crash_at=7)
    resumed = fit(config(tmp_path / "broken", onecycle), resume=True)
    assert resumed.resumed_from is not None and resumed.steps_run == 6  # from the checkpoint of step 6
    assert [h["lr"] for h in resumed.history] == lrs
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)

    # A resume that lengthens the run would step the scheduler past its end: one line instead.
    with pytest.raises(ConfigError, match="built with total_steps = 12, the run file now gives 16"):
        fit(config(tmp_path / "broken", {**onecycle, "epochs": 4}), resume=True)

    # Per epoch: CosineAnnealingLR's T_max is the run's 3 epochs, stepped at each epoch's end (the history shows the rate each epoch ran at).
    cosine = fit(
        config(tmp_path / "cosine", {"scheduler": "cosine_annealing", "scheduler_interval": "epoch"})
    )
    assert cosine.scheduler.scheduler.T_max == 3
    assert [h["lr"] for h in cosine.history] == pytest.approx([1e-3, 7.5e-4, 2.5e-4], abs=1e-12)

    # A run directory's import paths here are code to import: refused unless vouched for (docs/security.md).
    for key, raw in (("optim.name", {"optim": {"name": "torch.optim:RAdam"}}),
                     ("optim.scheduler", {"optim": {"name": "adam", "scheduler": "my_pkg:Sched"}}),
                     ("train.step", {"train": {"step": "my_pkg:step"}})):  # fmt: skip
        with pytest.raises(UntrustedCode, match=f"{key} = .* is code to import"):
            check_trusted(raw, tmp_path)
        check_trusted(raw, tmp_path, trust_code=True)
    check_trusted(
        {"optim": {"name": "radam", "scheduler": "onecycle"}}, tmp_path
    )  # built-in names need no trust

    # The built-in schedule is built as before.
    train(config(tmp_path / "builtin", {"schedule": "cosine", "warmup_steps": 2}))


# -- a user's training step -----------------------------------------------------------------------------------------
def mse_step(model, batch):
    """What [train] loss = "mse" computes, written as a step, with the mean absolute error as a metric."""
    x, y = batch
    pred = model(x)
    return F.mse_loss(pred, y), {"mae": (pred - y).abs().mean()}


class FieldAndParameter(Dataset):
    """Samples as dicts: a field (4 values) and a scalar parameter per sample; the target is their product."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(3)
        self.field, self.param = torch.randn(n, 4, generator=g), torch.rand(n, 1, generator=g)
        self.target = self.field.sum(1, keepdim=True) * self.param

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"field": self.field[i], "param": self.param[i], "target": self.target[i]}


class TwoInputs(nn.Module):
    """A model of two inputs: a field and a parameter."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.field, self.param, self.out = nn.Linear(4, hidden), nn.Linear(1, hidden), nn.Linear(hidden, 1)

    def forward(self, field: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.field(field) * self.param(param)))


def physics_step(model, batch):
    """Data misfit plus a penalty (the prediction must vanish where the parameter does), with both as metrics."""
    pred = model(batch["field"], batch["param"])
    misfit = F.mse_loss(pred, batch["target"])
    penalty = model(batch["field"], torch.zeros_like(batch["param"])).pow(2).mean()
    return misfit + 0.1 * penalty, {"misfit": misfit, "penalty": penalty}


def test_a_users_step_equals_the_builtin_loss_and_trains_dicts_with_resume(tmp_path):
    # The same weights, losses and validation metric as [train] loss = "mse" (with gradient accumulation too).
    runs = {}
    for name, train_ in (("loss", {"metrics": ["mae"]}), ("step", {"step": "tests.test_reach:mse_step"})):
        runs[name] = train(config(tmp_path / name, {"epochs": 2}, {"accumulate": 2, **train_}))
    a, b = (torch.load(tmp_path / name / "model.pt") for name in ("loss", "step"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for keys in ("train_loss", "val_loss", "val_mae"):
        assert [h[keys] for h in runs["loss"]] == [h[keys] for h in runs["step"]]
    assert all(0 < h["train_mae"] < 10 for h in runs["step"])  # the step's metric, over the training samples

    # A 2-input model on dict samples: the step's metrics are logged (train_ and val_ prefixed); killed after step 6
    # and resumed, it ends with the unbroken run's weights and history (the epoch's running metric sums included).
    two = {"model": {"name": "tests.test_reach:TwoInputs"},
           "data": {"source": "tests.test_reach:FieldAndParameter", "batch_size": 20, "val_fraction": 0.25}}  # fmt: skip
    cfg = config(
        tmp_path / "whole", {"lr": 0.01}, {"step": "tests.test_reach:physics_step", "accumulate": 2}, **two
    )
    whole = fit(cfg)
    assert [set(h) >= {"train_misfit", "train_penalty", "val_loss", "val_misfit", "val_penalty"}
            for h in whole.history] == [True] * 3  # fmt: skip
    assert whole.history[-1]["val_misfit"] < whole.history[0]["val_misfit"]
    cfg = config(
        tmp_path / "broken", {"lr": 0.01}, {"step": "tests.test_reach:physics_step", "accumulate": 2}, **two
    )
    fit(cfg, crash_at=6)
    resumed = fit(cfg, resume=True)
    assert resumed.steps_run == 7 and len(resumed.history) == 3
    for h, r in zip(whole.history, resumed.history):
        assert h.keys() == r.keys()
        assert [r[k] for k in h if k not in ("data_wait", "time_s")] == pytest.approx(
            [h[k] for k in h if k not in ("data_wait", "time_s")], rel=1e-12
        )
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert json.loads((tmp_path / "broken" / "summary.json").read_text())["epochs"] == 3

    # bf16-mixed: autocast around the step.
    with pytest.warns(SetupWarning, match="bfloat16 autocast on CPU"):
        bf16 = train(config(tmp_path / "bf16", {"lr": 0.01}, {"step": "tests.test_reach:physics_step"},
                            precision={"mode": "bf16-mixed"}, **two))  # fmt: skip
    assert all(torch.isfinite(torch.tensor(h["val_loss"])) for h in bf16) and bf16[-1]["val_loss"] < 1

    # From Python: Trainer(step=...) without a loss; a step returning something else is one line.
    data = FieldAndParameter(40)
    Trainer(TwoInputs(), torch.optim.Adam(TwoInputs().parameters()), step=physics_step, max_epochs=1, batch_size=8,
            progress=False, plot=False).fit(data)  # fmt: skip
    with pytest.raises(TypeError, match="returned str; return the loss"):
        Trainer(TwoInputs(), torch.optim.SGD(TwoInputs().parameters()), step=lambda m, b: "oops", max_epochs=1,
                progress=False).fit(data)  # fmt: skip
    # Where a step cannot run, one line, before training.
    with pytest.raises(ConfigError, match="strategy Pipeline does not take a training step"):
        fit(
            config(
                tmp_path / "pipe",
                None,
                {"step": "tests.test_reach:mse_step"},
                parallel={"strategy": "pipeline"},
            )
        )
    with pytest.raises(ConfigError, match="give your step function by import path"):
        config(tmp_path, None, {"step": "mse_step"})
    # Without a step, dict samples are named with the fix.
    with pytest.raises(ValueError, match=r"samples are dicts \(field, param, target\).*\[train\] step"):
        fit(config(tmp_path / "nostep", **two))


@pytest.mark.mpi
def test_a_users_step_equals_the_builtin_loss_on_two_ranks_and_in_async_workers(tmp_path):
    script = "tests/scripts/step_equivalence.py"
    # 2 ranks, allreduce, 2 micro-batches per step.
    results = [run_ranks(2, [script, str(tmp_path / "allreduce"), "allreduce", "2"])]
    # async-shared's worker process, in a process of its own: the fork server it starts would outlive this test and
    # keep pytest's captured output.
    results.append(subprocess.run([sys.executable, script, str(tmp_path / "async"), "async-shared", "2",
                                   '{"workers": 1}'], capture_output=True, text=True, timeout=120, cwd=ROOT))  # fmt: skip
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["same_weights"] and out["loss"] == out["step"]
        assert all(
            0 < m < 10 for m in out["step_train_mae"] if m == m
        )  # NaN: async runs log no training metric
