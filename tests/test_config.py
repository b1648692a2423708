"""Run files: valid ones load; each kind of mistake gives one message naming the key and the fix."""

import subprocess
import sys

import pytest
import torch

from caldera.config import ConfigError, load_config
from caldera.train.run import build_checkpointer, build_loss, build_model

GOOD = {"model": {"name": "small_cnn"}, "data": {"source": "digits"}}


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_config_loads_with_defaults():
    assert load_config("examples/digits_async.toml").parallel.strategy == "async-shared"
    cfg = load_config("examples/heat_surrogate.toml")
    assert cfg.model.name == "unet_small"
    assert cfg.data.batch_size == 32
    assert cfg.parallel.strategy == "single"
    assert str(cfg.run_dir) == "runs/heat-surrogate"


def test_yaml_is_accepted(tmp_path):
    path = write(
        tmp_path, "model: {name: mlp, args: {sizes: [64, 10]}}\ndata: {source: digits}\n", "run.yaml"
    )
    cfg = load_config(path)
    assert cfg.model.args == {"sizes": [64, 10]}


def test_unknown_key_names_it_and_suggests_the_right_one(tmp_path):
    path = write(tmp_path, '[model]\nname = "mlp"\n[data]\nsource = "digits"\n[optim]\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "Did you mean 'lr'" in msg and str(path) in msg


def test_wrong_type_names_key_and_default():
    with pytest.raises(ConfigError) as err:
        load_config({**GOOD, "data": {"source": "digits", "batch_size": "big"}})
    assert (
        "data.batch_size" in str(err.value) and "'big'" in str(err.value) and "default 64" in str(err.value)
    )


def test_missing_required_section():
    with pytest.raises(ConfigError, match="missing key 'model'"):
        load_config({"data": {"source": "digits"}})


def test_missing_file_and_bad_syntax(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\nname = 1"))


def test_bad_import_path_and_builtin_typo():
    with pytest.raises(
        ConfigError, match=r"cannot import module 'no_such_pkg.models' \(No module named 'no_such_pkg'\)"
    ):
        load_config({**GOOD, "model": {"name": "no_such_pkg.models:Net"}})
    with pytest.raises(ConfigError, match="has no 'UNetSmal'.*Did you mean 'caldera.models:UNetSmall'"):
        load_config({**GOOD, "model": {"name": "caldera.models:UNetSmal"}})
    with pytest.raises(ConfigError, match="did you mean 'unet_small'"):
        load_config({**GOOD, "model": {"name": "unet_smal"}})


def test_unknown_strategy_lists_available():
    with pytest.raises(ConfigError, match="strategy = 'allreduse'.*available: .*single"):
        load_config({**GOOD, "parallel": {"strategy": "allreduse"}})


def test_async_strategies_are_configured_and_refuse_what_they_cannot_do():
    cfg = load_config({**GOOD, "parallel": {"strategy": "local-sgd", "sync_every": 4, "warmup_steps": 10}})
    assert (cfg.parallel.sync_every, cfg.parallel.warmup_steps) == (4, 10)
    with pytest.raises(ConfigError, match="max_staleness.*greater than or equal to 0"):
        load_config({**GOOD, "parallel": {"strategy": "async-ps", "max_staleness": -1}})
    cosine = load_config({**GOOD, "optim": {"schedule": "cosine"}, "parallel": {"strategy": "async-shared"}})
    assert cosine.optim.schedule == "cosine"  # applied per work item, by its global batch's index
    timed = load_config({**GOOD, "checkpoint": {"every": "10m"}, "parallel": {"strategy": "async-ps"}})
    assert timed.checkpoint.every == "10m"  # the asynchronous loops checkpoint at a consistent cut
    mixed = load_config(
        {**GOOD, "precision": {"mode": "bf16-mixed"}, "parallel": {"strategy": "async-shared"}}
    )
    assert mixed.precision.mode == "bf16-mixed"
    with pytest.raises(ConfigError, match="bf16-true.*'bf16-mixed'"):
        load_config({**GOOD, "precision": {"mode": "bf16-true"}, "parallel": {"strategy": "async-shared"}})


def test_overrides_apply_and_are_validated():
    cfg = load_config(GOOD, ["optim.lr=3e-4", "data.args.normalize=false", "optim.epochs=2"])
    assert (
        cfg.optim.lr == pytest.approx(3e-4)
        and cfg.optim.epochs == 2
        and cfg.data.args == {"normalize": False}
    )
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_config(GOOD, ["lr=3"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(GOOD, ["optim.lr=-1"])


def test_wrong_model_argument_names_valid_ones():
    cfg = load_config({**GOOD, "model": {"name": "unet_small", "args": {"chanels": 8}}})
    with pytest.raises(
        ConfigError, match=r"\[model\] args.*chanels.*accepts: in_channels, out_channels, channels"
    ):
        build_model(cfg)


def test_loss_arguments_reach_the_loss_and_a_wrong_one_is_named():
    pred, target = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    huber = build_loss(load_config({**GOOD, "train": {"loss": "huber", "loss_args": {"delta": 0.5}}}))
    # delta (|e| - delta / 2) on the one wrong element, averaged over two
    assert float(huber(pred, target)) == pytest.approx(0.5 * 0.5 * (3.0 - 0.25))
    weighted = {"loss": "caldera.models.potential:energy_force_loss", "loss_args": {"force_weight": 0.0}}
    energy_only = build_loss(load_config({**GOOD, "train": weighted}))
    packed = torch.tensor([[0.0, 3.0, 0.0, 0.0]])  # [energy, force of one atom]
    assert float(energy_only(packed, torch.zeros(1, 4))) == 0.0  # the force error is weighted out
    with pytest.raises(
        ConfigError, match=r"\[train\] loss_args.*force_weigth.*accepts: pred, target, force_weight"
    ):
        build_loss(load_config({**GOOD, "train": {**weighted, "loss_args": {"force_weigth": 0.1}}}))


def test_metrics_where_higher_is_better_keep_their_best_checkpoint(tmp_path):
    from caldera.world import init

    cfg = {**GOOD, "run": {"dir": str(tmp_path)}, "checkpoint": {"keep_best": "val_psnr"}}
    assert build_checkpointer(load_config(cfg), init()).best_mode == "max"
    cfg["checkpoint"]["keep_best"] = "val_loss"
    assert build_checkpointer(load_config(cfg), init()).best_mode == "min"


def test_cli_reports_config_error_without_traceback(tmp_path):
    path = write(tmp_path, '[model]\nname = "mlp"\n[data]\nsource = "digits"\nbatch = 3\n')
    proc = subprocess.run(
        [sys.executable, "-m", "caldera.cli", "train", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown key 'data.batch'" in proc.stderr and "Did you mean 'batch_size'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_device_and_deterministic_options_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config({**GOOD, "run": {"device": "gpu"}})
    assert "run.device" in str(err.value) and "'cuda'" in str(err.value)
    cfg = load_config({**GOOD, "run": {"device": "cpu", "deterministic": True}})
    assert cfg.run.device == "cpu" and cfg.run.deterministic


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    path = write(tmp_path, '[model]\nname = "mlp"\n[data]\nsource = "digits"\n[run]\ndevice = "cuda"\n')
    proc = subprocess.run([sys.executable, "-m", "caldera.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sees no CUDA GPU" in proc.stderr and 'device = "auto" or "cpu"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_weights_start_a_run_from_an_earlier_one(tmp_path):
    from caldera.train.run import build_model

    cfg = load_config({**GOOD, "model": {"name": "mlp", "args": {"sizes": [4, 8, 2]}}})
    earlier = build_model(cfg)
    torch.save(earlier.state_dict(), tmp_path / "model.pt")
    fine = build_model(load_config({**GOOD, "model": {"name": "mlp", "args": {"sizes": [4, 8, 2]},
                                                      "weights": str(tmp_path / "model.pt")}}))  # fmt: skip
    for a, b in zip(earlier.state_dict().values(), fine.state_dict().values()):
        assert torch.equal(a, b)
    other = {
        **GOOD,
        "model": {"name": "mlp", "args": {"sizes": [4, 16, 2]}, "weights": str(tmp_path / "model.pt")},
    }
    with pytest.raises(ConfigError, match=r"does not fit this model: .*other shapes \['1\.weight'"):
        build_model(load_config(other))
    with pytest.raises(ConfigError, match="no such file"):
        build_model(load_config({**GOOD, "model": {"name": "mlp", "weights": str(tmp_path / "none.pt")}}))
