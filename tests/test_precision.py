"""Precision modes: the fp16 loss scaler, bf16 master weights, every mode trains, and ranks agree on skips."""

import functools
import json
import math

import pytest
import torch
from torch import nn

import caldera
from caldera.checkpoint import Checkpointer
from caldera.config import load_config
from caldera.precision import (
    FP32,
    MODES,
    BF16Mixed,
    BF16True,
    DynamicLossScaler,
    FP16Mixed,
    make_precision,
)
from tests.conftest import ROOT, run_ranks

pytestmark = pytest.mark.filterwarnings("ignore:.*autocast on CPU works but is rarely faster")


def regression(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))


def backward(policy, model, x, y):
    with policy.autocast():
        loss = nn.functional.mse_loss(model(x), y)
    policy.scale_loss(loss).backward()


def test_make_precision_returns_each_mode():
    assert [type(make_precision(m)) for m in MODES] == [FP32, BF16Mixed, FP16Mixed, BF16True]
    assert [make_precision(m).mode for m in MODES] == list(MODES)
    policy = FP16Mixed()
    assert make_precision(policy) is policy
    with pytest.raises(ValueError, match="unknown precision mode 'fp8'"):
        make_precision("fp8")


def test_fp16_gradients_are_unscaled_and_an_overflow_skips_the_step():
    x, y = regression(32)
    ref = mlp()
    nn.functional.mse_loss(ref(x), y).backward()
    policy, model = FP16Mixed(), mlp()
    opt = policy.wrap_optimizer(torch.optim.SGD(policy.setup_model(model).parameters(), lr=0.1))
    backward(policy, model, x, y)
    # Strategies (clipping, all-reduce) see true gradients, not gradients times 65536.
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=2e-3, rtol=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad[0, 0] = math.inf  # one overflowed element anywhere is enough
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # step skipped
    assert policy.scaler.scale == 2.0**15 and policy.scaler.skipped == 1
    opt.zero_grad(set_to_none=True)
    backward(policy, model, x, y)
    opt.step()  # clean gradients: this one is taken
    assert not torch.equal(model[0].weight, before[0])
    assert policy.scaler.skipped == 1 and policy.scaler.growth_tracker == 1


def test_scale_grows_after_growth_interval_clean_steps_and_backs_off_on_nan():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    clean, bad = [torch.ones(3)], [torch.tensor([1.0, math.nan])]
    assert scaler.update(clean) and scaler.update(clean) and scaler.scale == 8.0
    assert scaler.update(clean) and scaler.scale == 16.0 and scaler.growth_tracker == 0
    assert scaler.update(clean) and scaler.growth_tracker == 1
    assert not scaler.update(bad)
    assert (scaler.scale, scaler.growth_tracker, scaler.skipped) == (8.0, 0, 1)


def test_nan_at_every_scale_raises_a_clear_error():
    x, y = regression(64)
    x[::16, 0] = math.nan  # a NaN sample in every batch: the gradients are NaN whatever the scale
    model = mlp()
    policy = FP16Mixed(init_scale=4.0, min_scale=1.0)
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), max_epochs=1,
                              batch_size=16, progress=False, precision=policy, shuffle=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match="not an fp16 overflow.*NaN/inf at any scale"):
        trainer.fit((x, y))
    assert policy.scaler.skipped == 3


def test_state_dicts_round_trip():
    scaler = DynamicLossScaler(init_scale=32.0, growth_interval=2)
    scaler.update([torch.tensor([math.inf])])
    scaler.update([torch.ones(1)])
    restored = FP16Mixed()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == {"scale": 16.0, "growth_tracker": 1, "skipped": 1}
    # fp16 wrapper: optimizer state and scaler state together.
    policy, model = FP16Mixed(), mlp()
    opt = policy.wrap_optimizer(torch.optim.Adam(model.parameters(), lr=0.01))
    x, y = regression(16)
    backward(policy, model, x, y)
    opt.step()
    other = FP16Mixed()
    other_opt = other.wrap_optimizer(torch.optim.Adam(mlp(1).parameters(), lr=0.01))
    other_opt.load_state_dict(opt.state_dict())
    assert other.state_dict() == policy.state_dict()
    assert other_opt.state_dict()["optimizer"]["state"][0]["step"] == 1
    # bf16-true: the fp32 masters come back and are rounded into the bf16 weights.
    policy = BF16True()
    model = policy.setup_model(mlp())
    policy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    state = {"masters": [m + 1e-3 for m in policy.state_dict()["masters"]]}
    other = BF16True()
    other_model = other.setup_model(mlp(1))
    other_opt = other.wrap_optimizer(torch.optim.SGD(other_model.parameters(), lr=0.1))
    other.load_state_dict(state)
    for m, saved, p in zip(other.state_dict()["masters"], state["masters"], other_model.parameters()):
        assert torch.equal(m, saved) and torch.equal(p, saved.bfloat16())
    assert other_opt.state_dict()["masters"][0] is other.state_dict()["masters"][0]


# The dtype each mode's matmuls compute in on a CPU (torch >= 2.4 has fp16 autocast there).
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16,
                 "bf16-true": torch.bfloat16}  # fmt: skip


@functools.cache  # the fp32 run is every other mode's reference: train it once per test process
def train_small_mlp(mode):
    """Train the small MLP for 6 epochs in ``mode``; return the trainer, its history and the output dtypes its
    first Linear produced inside the trainer's forward passes."""
    x, y = regression(256)
    model = mlp()
    seen = set()
    model[0].register_forward_hook(lambda _, __, out: seen.add(out.dtype))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = caldera.Trainer(model, opt, nn.MSELoss(), max_epochs=6, batch_size=32, progress=False,
                              precision=mode, plot=False)  # fmt: skip
    history = trainer.fit((x, y), (x[:64], y[:64]))
    return trainer, history, seen


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_a_small_mlp_in_its_own_dtype(mode):
    trainer, history, seen = train_small_mlp(mode)
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"], history
    assert history[-1]["val_loss"] < 0.7 * history[0]["val_loss"], history
    assert math.isfinite(history[-1]["val_loss"])
    assert trainer.precision.mode == mode
    # "The loss fell" holds in fp32 too: a mode that silently ran in fp32 (autocast lost) must fail here.
    assert seen == {COMPUTE_DTYPE[mode]}, seen
    # The same seed and batches as fp32: equal weights would mean the mode's rounding never happened.
    if mode != "fp32":
        reference = train_small_mlp("fp32")[0].model.parameters()
        assert not all(torch.equal(p.float(), r) for p, r in zip(trainer.model.parameters(), reference))


def test_bf16_true_keeps_bf16_weights_fp32_masters_and_follows_fp32():
    x, y = regression(64)
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # built on the user's optimizer
    trainer = caldera.Trainer(model, opt, nn.MSELoss(), max_epochs=1, batch_size=16, progress=False,
                              precision="bf16-true", scheduler=scheduler, shuffle=False)  # fmt: skip
    trainer.fit((x, y))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for xb, yb in zip(x.split(16), y.split(16)):  # the same four batches and schedule, in fp32
        nn.functional.mse_loss(ref(xb), yb).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_opt.param_groups[0]["lr"] *= 0.5
    masters = trainer.precision.state_dict()["masters"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in masters)
    assert trainer.optimizer.param_groups[0]["params"][0] is masters[0]  # the optimizer steps the masters
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 16)  # the scheduler drove it
    for p, m, r in zip(model.parameters(), masters, ref.parameters()):
        assert torch.equal(p, m.bfloat16())
        torch.testing.assert_close(m, r.detach(), atol=2e-3, rtol=0)  # the weights moved by up to 6e-2
    assert model(x).dtype == torch.float32  # fp32 in, fp32 out: plots and user code need no autocast


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-true"])
def test_checkpoint_resume_restores_scaler_and_masters_bit_for_bit(tmp_path, mode):
    x, y = regression(96)

    def run(directory, resume=False):
        world = caldera.init(seed=0)
        model = mlp()
        policy = FP16Mixed(growth_interval=3) if mode == "fp16-mixed" else make_precision(mode)
        trainer = caldera.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), nn.MSELoss(),
                                  max_epochs=2, batch_size=16, progress=False, precision=policy,
                                  checkpointer=Checkpointer(directory, world, every=9, async_write=False),
                                  resume=resume)  # fmt: skip
        trainer.fit((x, y))
        return trainer

    ref = run(tmp_path / "ref")
    resumed = run(tmp_path / "cut", resume=tmp_path / "ref" / "step-000000009")  # 3 steps into epoch 2
    assert resumed.global_step == ref.global_step == 12
    for p, r in zip(resumed.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, r)
    a, b = resumed.precision.state_dict(), ref.precision.state_dict()
    if mode == "fp16-mixed":
        assert a == b and a["skipped"] >= 1  # scale, clean-step count and skipped steps carried over
    else:
        assert all(torch.equal(m, r) for m, r in zip(a["masters"], b["masters"]))


def test_config_accepts_every_mode():
    for mode in MODES:
        cfg = load_config(ROOT / "examples/heat_surrogate.toml", overrides=[f"precision.mode={mode}"])
        assert cfg.precision.mode == mode


def test_cli_trains_the_main_job_in_bf16_mixed(tmp_path):
    from caldera.cli import main

    assert main(["train", "examples/heat_surrogate.toml", "--set", "precision.mode=bf16-mixed", "--set",
                 "optim.epochs=1", "--set", "data.args.n_samples=64", "--set", f"run.dir={tmp_path}"]) == 0  # fmt: skip
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])


@pytest.mark.mpi
def test_fp16_ranks_skip_together_and_end_identical():
    proc = run_ranks(2, ["tests/scripts/precision_dp.py", "fp16-mixed"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert out["size"] == 2 and out["finite"]
    assert out["dtypes"] == [["torch.float16"]] * 2, out  # every rank computed in fp16, not silently fp32
    assert out["spread"] == 0.0, out  # bit-identical weights on both ranks
    assert out["states"][0] == out["states"][1], out  # same scale, same number of skipped steps
    assert out["states"][0]["skipped"] >= 1  # rank 1's injected overflow was skipped by both
    assert out["after"] < 0.7 * out["before"], out
    # Set-up advice that every rank would give alike (fp16 autocast on a CPU) is printed once, by rank 0.
    assert proc.stderr.count("autocast on CPU works but is rarely faster") == 1, proc.stderr[-2000:]
