"""The single-process Trainer: it learns, repeats bit for bit, writes its run directory, fails clearly."""

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.data import digits, split_dataset
from caldera.models import SmallCNN


def digits_split():
    return split_dataset(digits(), 0.2, seed=0)


@pytest.fixture
def deterministic_kernels():
    """Deterministic kernels for one test (a GPU run repeats bit for bit only with them), then the defaults back."""
    caldera.world.make_deterministic()
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def make_trainer(tmp_path=None, epochs=2, seed=0, **kw):
    caldera.init(seed=seed)
    model = SmallCNN(channels=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return caldera.Trainer(model, opt, nn.CrossEntropyLoss(), metrics={"accuracy": caldera_acc()}, max_epochs=epochs,
                           run_dir=tmp_path, batch_size=32, seed=seed, progress=False, **kw)  # fmt: skip


def caldera_acc():
    from caldera.train.metrics import accuracy

    return accuracy


def test_digits_cnn_reaches_95_percent(tmp_path):
    train, val = digits_split()
    trainer = make_trainer(tmp_path, epochs=12)
    history = trainer.fit(train, val)
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 3
    assert history[-1]["val_accuracy"] >= 0.95, history[-1]
    # The run directory holds what a user looks at.
    for name in ("metrics.jsonl", "metrics.csv", "model.pt", "learning_curve.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    # Weights load back with plain torch and reproduce the validation accuracy.
    fresh = SmallCNN(channels=16)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    x, y = val.tensors
    with torch.no_grad():
        acc = (fresh(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(history[-1]["val_accuracy"], abs=1e-6)


def test_same_seed_gives_bit_identical_weights(deterministic_kernels):
    train, val = digits_split()
    runs = []
    for _ in range(2):
        caldera.world.reset()
        t = make_trainer(epochs=2, seed=7)
        t.fit(train, val)
        runs.append([p.detach().clone() for p in t.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    caldera.world.reset()
    other = make_trainer(epochs=2, seed=8)
    other.fit(train, val)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], other.model.parameters()))


def test_numpy_arrays_are_accepted_and_regression_learns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)).astype(np.float32)
    caldera.init(seed=0)
    model = nn.Linear(4, 1)
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), max_epochs=20,
                              batch_size=64, progress=False)  # fmt: skip
    history = trainer.fit((x, y), (x[:64], y[:64]))
    assert history[-1]["val_loss"] < 1e-6
    np.testing.assert_allclose(model.weight.detach().numpy(), [[1.0, -2.0, 0.5, 3.0]], atol=1e-3)


def test_early_stopping_stops(tmp_path):
    train, val = digits_split()
    stopper = caldera.EarlyStopping("val_loss", patience=1, min_delta=10.0)  # no epoch can improve by 10
    history = make_trainer(epochs=10, callbacks=[stopper]).fit(train, val)
    assert len(history) == 2


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.lin(x.flatten(1))
        return out * float("nan") if self.calls > 60 else out


def test_nan_loss_stops_with_a_message_naming_the_step_and_keeps_files(tmp_path):
    train, val = digits_split()
    caldera.init(seed=0)
    model = Exploding()
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                              max_epochs=5, run_dir=tmp_path, batch_size=32, progress=False)  # fmt: skip
    with pytest.raises(
        caldera.NonFiniteLossError, match=r"loss is nan at epoch 2, step \d+ .*lower \[optim\] lr"
    ):
        trainer.fit(train, val)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 survived


def test_world_is_a_single_cpu_process_without_mpi():
    world = caldera.init()
    assert (world.rank, world.size, world.local_rank) == (0, 1, 0)
    assert world.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert caldera.init() is world


@pytest.mark.parametrize("batch", [32, 30])  # 30 in 4 micro-batches: 8, 8, 7, 7 samples
def test_accumulated_micro_batches_give_the_same_update(batch):
    data = TensorDataset(torch.randn(120, 8), torch.randint(0, 3, (120,)))
    runs = []
    for accumulate in (1, 4):
        caldera.init(seed=0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=2, batch_size=batch,
                                  progress=False, accumulate=accumulate)  # fmt: skip
        history = trainer.fit(data)
        runs.append(
            (torch.cat([p.detach().flatten() for p in model.parameters()]), history, trainer.global_step)
        )
    (whole, h1, steps1), (micro, h4, steps4) = runs
    assert steps1 == steps4  # one optimizer step per batch, however many micro-batches
    assert (whole - micro).abs().max() < 1e-6  # the same update up to rounding ...
    assert not torch.equal(whole, micro)  # ... reached another way (4 backward passes per step)
    assert h4[-1]["train_loss"] == pytest.approx(h1[-1]["train_loss"], abs=1e-6)


def test_activation_checkpointing_keeps_less_and_computes_the_same():
    from caldera.models import UNetSmall
    from caldera.train.recompute import saved_activation_bytes

    x, y = torch.randn(4, 2, 32, 32), torch.randn(4, 1, 32, 32)
    grads, kept = [], []
    for recompute in (False, True):
        caldera.init(seed=0)
        model = UNetSmall(channels=8)
        trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                  progress=False, activation_checkpointing=recompute)  # fmt: skip
        kept.append(saved_activation_bytes(model, x))
        nn.functional.mse_loss(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert trainer.recomputed == (
            ["enc1", "enc2", "mid", "up2", "dec2", "up1", "dec1", "out"] if recompute else []
        )
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-6)  # the same gradients ...
    assert kept[1] < 0.5 * kept[0], kept  # ... from less than half the memory kept for backward
    assert set(model.state_dict()) == set(UNetSmall(channels=8).state_dict())  # weights files are unchanged


def test_offloading_activations_on_the_cpu_warns_and_changes_nothing():
    train, _ = digits_split()
    weights = []
    for offload in (False, True):
        caldera.world.reset()
        with pytest.warns(UserWarning, match="on the CPU it does nothing") if offload else nullcontext():
            trainer = make_trainer(epochs=1, seed=3, offload_activations=offload)
        trainer.fit(train)
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offloaded_activations_leave_the_gpu_and_give_the_same_gradients():
    from caldera.models import UNetSmall
    from caldera.parallel.base import activations_offloaded

    x, y = torch.randn(8, 2, 64, 64, device="cuda"), torch.randn(8, 1, 64, 64, device="cuda")
    held, grads = [], []
    for offload in (False, True):
        caldera.world.reset()
        caldera.init(seed=0)
        model = UNetSmall(channels=16)
        trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), progress=False,
                                  offload_activations=offload)  # fmt: skip
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with activations_offloaded(trainer.offload_activations):
            loss = nn.functional.mse_loss(trainer.model(x), y)
        held.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    assert held[1] < 0.3 * held[0], held  # the saved activations went to host memory
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-5)


def test_the_trainer_is_the_run_context_a_loop_strategy_drives(tmp_path):
    from caldera.checkpoint import Checkpointer
    from caldera.comm.buckets import flatten
    from caldera.parallel.context import RunContext, Snapshot, trainable

    def trainer(resume=False):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        ckpt = Checkpointer(tmp_path / "ckpt", caldera.init(), async_write=False)
        t = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.mse_loss,
                            run_dir=tmp_path / "run", progress=False, plot=False, checkpointer=ckpt, resume=resume)  # fmt: skip
        ckpt.begin(resume=resume)
        return t

    ctx = trainer()
    # Every member of the protocol is there, and every method is a method (Trainer.progress is a bool, not it).
    members = [n for n in [*RunContext.__annotations__, *vars(RunContext)] if not n.startswith("_")]
    assert {"model", "save", "restore", "report", "progress_bar", "log"} <= set(members)
    assert all(hasattr(ctx, n) for n in members), [n for n in members if not hasattr(ctx, n)]
    assert all(
        callable(getattr(ctx, n)) for n in vars(RunContext) if callable(vars(RunContext)[n]) and n[0] != "_"
    )
    with ctx.progress_bar(7) as bar:  # progress off: no bar, but the total is the run's
        assert bar is None and ctx.total_steps == 7
    # A strategy's snapshots become the history, the metrics files, strategy.json and the final weights.
    w = [torch.full((4,), v) for v in (1.0, 2.0)]
    val = TensorDataset(torch.zeros(4, 3), torch.ones(4, 1))
    history = ctx.report([Snapshot(5, 0.5, w[0], 2.0, 4), Snapshot(10, 1.5, w[1], 1.0, 4)], val, per_epoch=5,
                         stats={"updates": 10}, lr=lambda item: 0.01 * item)  # fmt: skip
    assert [h["epoch"] for h in history] == [1.0, 2.0] and [h["train_loss"] for h in history] == [0.5, 0.25]
    assert [h["lr"] for h in history] == [0.04, 0.09] and [h["time_s"] for h in history] == [0.5, 1.0]
    assert history[1]["val_loss"] == pytest.approx(1.0)  # weights 2, bias 2, inputs 0: predicts 2, target 1
    assert json.loads((tmp_path / "run" / "strategy.json").read_text()) == {"updates": 10}
    assert torch.equal(flatten(trainable(ctx.model)), w[1]) and ctx.global_step == 10
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    # save at a loop strategy's cut; restore hands each rank its own part back.
    ctx.save(10, 2, 0, local={"buffers": [torch.arange(3.0)]})
    again = trainer(resume=True)
    local = again.restore()
    assert torch.equal(local["buffers"][0], torch.arange(3.0)) and (again.global_step, again.epoch) == (10, 2)
    assert torch.equal(flatten(trainable(again.model)), w[1])
