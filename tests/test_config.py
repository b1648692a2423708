"""Run files: valid ones load; each kind of mistake gives one message naming the key and the fix."""

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from caldera.config import ConfigError, load_config, read_run_dir
from caldera.names import STRATEGIES
from caldera.parallel import available_strategies, make_strategy
from caldera.train.run import build_checkpointer, build_loss, build_model

GOOD = {"model": {"name": "small_cnn"}, "data": {"source": "digits"}}
GOOD_TOML = '[model]\nname = "mlp"\n[run]\ndir = "run"\n[train]\nprogress = false\nplot = false\n[data]\nsource = "digits"\n'


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
    cfg = load_config(
        {**GOOD, "parallel": {"strategy": "local-sgd", "sync_every": 4, "sync_warmup_steps": 10}}
    )
    assert cfg.parallel.options == {"sync_every": 4, "sync_warmup_steps": 10, "average_state": False}
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


def test_parallel_keys_are_the_chosen_strategys_options(tmp_path):
    """[parallel] is strategy plus that strategy's own options: a key of another strategy, a misspelling or an old
    spelling is one line naming the strategy and its keys; durations are parsed at load; Python keywords too."""
    cfg = load_config({**GOOD, "optim": {"schedule": "cosine", "warmup_steps": 5},
                       "parallel": {"strategy": "async-ps", "dead_timeout": "2m", "max_staleness": 1}})  # fmt: skip
    assert cfg.parallel.options == {
        "servers": 1,
        "max_staleness": 1,
        "dead_timeout": 120.0,
        "pipeline": False,
    }
    assert (cfg.optim.schedule, cfg.optim.warmup_steps) == ("cosine", 5)  # [optim]'s keys no longer clash
    record = json.loads(
        json.dumps(cfg.model_dump())
    )  # config.resolved.json: flat, every option, reloads alike
    assert record["parallel"] == {"strategy": "async-ps", **cfg.parallel.options}
    assert load_config(record).parallel.options == cfg.parallel.options
    path = write(tmp_path, GOOD_TOML + '[parallel]\nstrategy = "allreduce"\nbucket_mb = 25\nstaleness = 3\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'parallel.staleness' = 3: not an option of strategy 'allreduce'; its options: bucket_mb, overlap, " \
        "reducer, grad_comm, shard_optimizer, shard_gradients, shard_params, fused_linear_grads" in str(err.value)  # fmt: skip
    for parallel, expected in [
        ({"strategy": "async-ps", "dead_timeout": "soon"}, "'parallel.dead_timeout' = 'soon': value error, 'soon' "
         "is not a duration"),
        ({"strategy": "allreduce", "bucket_m": 4}, "did you mean 'bucket_mb'? its options: bucket_mb"),
        ({"bucket_mb": 4}, "not an option of strategy 'single' (it is one of 'allreduce'); its options: none"),
        ({"strategy": "async-ps", "workers": 4}, "of strategy 'async-ps' (it is one of 'async-shared')"),
        ({"strategy": "pipeline", "schedule": "gpipe"}, "'parallel.schedule' = 'gpipe': renamed to "
         "'pipeline_schedule' (write pipeline_schedule = 'gpipe')"),
        ({"strategy": "local-sgd", "warmup_steps": 9}, "renamed to 'sync_warmup_steps'"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load_config({**GOOD, "parallel": parallel})
        assert expected in str(err.value), str(err.value)
    # The CLI: the problem on its own line, exit 2, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "caldera.cli", "check", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not an option of strategy 'allreduce'" in proc.stderr
    assert "Traceback" not in proc.stderr
    # From Python: a keyword the strategy does not take is a TypeError naming the ones it does.
    with pytest.raises(TypeError, match=r"strategy 'allreduce' has no option 'bucket_m'; did you mean 'bucket_mb'\? "
                       r"its options: bucket_mb, first_bucket_mb, overlap, grad_clip"):  # fmt: skip
        make_strategy("allreduce", bucket_m=4)
    with pytest.raises(TypeError, match="has no option 'schedule'; did you mean 'pipeline_schedule'"):
        make_strategy("pipeline", schedule="gpipe")
    # Each Options model holds the constructor's keywords with the same defaults (one source for both doors).
    for name in available_strategies():
        cls = STRATEGIES[name]
        params = inspect.signature(cls).parameters
        for key, field in cls.Options.model_fields.items():
            assert params[key].kind is params[key].KEYWORD_ONLY and params[key].default == field.default, (
                name,
                key,
            )


def test_a_run_directory_from_before_per_strategy_options_still_reads(tmp_path):
    """config.resolved.json of an older run records every strategy's keys; predict and serve still read it."""
    old = {"strategy": "pipeline", "bucket_mb": 25.0, "workers": 2, "schedule": "gpipe", "warmup_steps": 0,
           "micro_batches": 2, "dead_timeout": 60.0}  # fmt: skip
    (tmp_path / "config.resolved.json").write_text(json.dumps({**GOOD, "parallel": old}))
    (tmp_path / "model.pt").write_bytes(b"")
    cfg = load_config(read_run_dir(tmp_path))
    assert cfg.parallel.options == {
        "micro_batches": 2,
        "balance": None,
        "pipeline_schedule": "gpipe",
        "stages": None,
    }


def test_a_users_strategy_brings_its_own_options():
    code = """
from pydantic import Field
from caldera.config import ConfigError, StrategyOptions, load_config
from caldera.parallel import make_strategy, register
from caldera.parallel.single import Single

class ToyOptions(StrategyOptions):
    period: int = Field(3, ge=1, description="toy: every this many steps")

@register("toy")
class Toy(Single):
    Options = ToyOptions

    def __init__(self, *, period: int = 3, grad_clip: float | None = None) -> None:
        super().__init__(grad_clip=grad_clip)
        self.period = period

good = {"model": {"name": "mlp"}, "data": {"source": "digits"}}
cfg = load_config({**good, "parallel": {"strategy": "toy", "period": 5}})
print(make_strategy("toy", **cfg.parallel.options).period)
for bad in ({"period": 0}, {"bucket_mb": 1}):
    try:
        load_config({**good, "parallel": {"strategy": "toy", **bad}})
    except ConfigError as exc:
        print(str(exc).splitlines()[1])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == [
        "5",
        "  - 'parallel.period' = 0: input should be greater than or equal to 1 (toy: every this many steps; "
        "default 3)",
        "  - 'parallel.bucket_mb' = 1: not an option of strategy 'toy' (it is one of 'allreduce'); its options: "
        "period",
    ]


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


def cli(*args):
    """Run the caldera command in this process; return (exit code, stderr)."""
    import contextlib
    import io

    from caldera.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def assert_one_line(code, err, *expected):
    assert code == 2 and err.count("\n") == 1 and err.startswith("caldera: error: "), err
    for text in expected:
        assert text in err, err


def test_issue17_bad_inputs_are_one_line_before_anything_is_built(tmp_path):
    """Issue 17 item 8, case by case: each was a traceback (exit 1), a hang or accepted."""
    import time

    import h5py

    base = GOOD_TOML.replace('dir = "run"', f'dir = "{tmp_path / "run"}"')

    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(bytes(range(256)) * 3)
    assert_one_line(*cli("check", garbage), "garbage.toml: not a text file", "TOML or YAML")
    (tmp_path / "dir.toml").mkdir()
    assert_one_line(*cli("check", tmp_path / "dir.toml"), "dir.toml: not a file")
    good = write(tmp_path, base, "good.toml")
    assert_one_line(
        *cli("check", good, "--set", "optim.lr=["), "--set 'optim.lr=[': the value is not valid YAML"
    )
    # A 700-byte alias bomb: 9**7 values once expanded; refused at the first alias, in milliseconds.
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"] + [
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdef", "bcdefg")
    ]
    bomb = write(
        tmp_path,
        "model: {name: mlp}\ndata:\n  source: digits\n  args:\n    " + "\n    ".join(levels) + "\n",
        "bomb.yaml",
    )
    assert len(bomb.read_bytes()) < 800
    start = time.perf_counter()
    assert_one_line(*cli("check", bomb), "alias *a is not allowed in a run file")
    assert_one_line(*cli("train", bomb), "alias *a is not allowed in a run file")
    assert time.perf_counter() - start < 5
    for value in ("100000000000000000000", "1e20"):
        big = write(tmp_path, base + f"batch_size = {value}\n", "big.toml")
        code, err = cli("check", big)
        assert code == 2 and "'data.batch_size'" in err, err
    code, err = cli("check", good, "--set", "data.batch_size=99999999999")
    assert code == 2 and "less than or equal to 16777216" in err, err
    code, err = cli("check", good, "--set", "optim.epochs=99999999999999999999")
    assert code == 2 and "'optim.epochs'" in err and "must be between" in err, err
    for value in ("inf", "nan", "-inf"):
        code, err = cli("check", good, "--set", f"optim.lr={value if value != 'nan' else '.nan'}")
        assert code == 2 and "'optim.lr'" in err and "finite number" in err, err
    for trials in (
        "0",
        "-1",
        "99999999999999999999",
    ):  # -1 was a StopIteration traceback after the trials ran
        code, err = cli("tune", good, "--trials", trials, "--set", "tune.space={optim.lr: [0.1, 0.2]}")
        assert code == 2 and f"'tune.trials' = {trials}:" in err, err
    code, err = cli("check", good, "--set", "checkpoint.time_limit=1:xx")
    assert code == 2 and "[checkpoint] time_limit: '1:xx' is not a duration" in err, err
    # --time-limit is checked before the data: this data file does not exist, yet the time limit is named.
    missing_data = write(tmp_path, base.replace('"digits"', '"caldera.data.scientific:dataset"')
                         + f'args = {{path = "{tmp_path / "none.h5"}", inputs = "T"}}\n')  # fmt: skip
    for limit in ("abc", "1:xx", "-5", "nan"):
        assert_one_line(*cli("train", missing_data, "--time-limit", limit), f"--time-limit '{limit}' is not")
    assert not (tmp_path / "run").exists()
    # Issue 17 item 9 through the command: a damaged data file and a model that does not fit the data.
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f.create_dataset("T", data=np.zeros((40, 8)))
    broken.write_bytes(broken.read_bytes()[:1500])
    on_broken = write(tmp_path, missing_data.read_text().replace(str(tmp_path / "none.h5"), str(broken)))
    assert_one_line(*cli("train", on_broken), "hdf5 file", "broken.h5' cannot be read", "truncated")
    narrow = write(tmp_path, base.replace('name = "mlp"', 'name = "mlp"\nargs = {sizes = [50, 10]}'))
    assert_one_line(*cli("train", narrow, "--set", "train.loss=cross_entropy"),
                    "[model] 'mlp' with args {'sizes': [50, 10]} does not take the data's samples of shape (1, 8, 8)",
                    "1x64 and 50x10")  # fmt: skip
