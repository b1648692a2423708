"""Run files: a typed schema for TOML/YAML configs, loading, overrides, and errors that name the key and the fix.

A run file has the sections ``[run] [model] [data] [optim] [train] [parallel] [precision]``. Every key is
checked before anything runs; a mistake produces one ``ConfigError`` naming the file, the key, what was wrong
and what to write instead, never a traceback wall.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from caldera.durations import check_time_limit, parse_duration, parse_interval
from caldera.errors import ConfigError as ConfigError
from caldera.errors import UntrustedCode as UntrustedCode
from caldera.names import (
    LOSSES,
    METRICS,
    MODELS,
    NOT_COMPILED,
    OPTIMIZERS,
    SCHEDULERS,
    SOURCES,
    STRATEGIES,
    WEIGHT_SHARDS,
    unsupported,
)
from caldera.refs import Builtins
from caldera.refs import resolve as resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Integers beyond this overflow torch and C code long before they mean anything (a batch of 1e20 samples).
INT_LIMIT = 2**31 - 1
# A run file is a few kilobytes of text; anything far larger is a wrong path, not a config.
MAX_RUN_FILE_BYTES = 4 << 20


class _Section(BaseModel):
    # Floats must be finite: lr = inf or nan would pass every bound below and ruin the run at its first step.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
            raise ValueError(f"must be between -{INT_LIMIT} and {INT_LIMIT}")
        return value


class RunSection(_Section):
    name: str = "run"
    seed: int = 0
    deterministic: bool = Field(
        False,
        description="deterministic GPU kernels: GPU runs repeat bit for bit (CPU runs always do), a bit slower",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: a GPU per local rank if any, else the CPU"
    )
    dir: str | None = Field(None, description="run directory; default runs/<name>")
    hang_timeout: str | float | None = Field(
        None,
        description="end the job with a report naming the stuck ranks when none has progressed this long "
        "('30m', seconds; 0 = off); default 30m on several ranks, off in one process",
    )


class ModelSection(_Section):
    name: str = Field(description="built-in model name or 'package.module:Callable'")
    args: dict[str, Any] = {}
    weights: str | None = Field(
        None, description="start from these weights (an earlier run's model.pt): fine-tuning, transfer"
    )


class DataSection(_Section):
    source: str = Field(description="built-in data name or 'package.module:callable' returning datasets")
    args: dict[str, Any] = {}
    batch_size: int = Field(
        64, gt=0, le=2**24, description="global batch size; each rank takes batch_size / ranks"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = Field(0, ge=0)


class OptimSection(_Section):
    name: str = Field(
        "adam", description="sgd | adam | adamw | radam | nadam | adamax | adagrad | adadelta | rmsprop | an "
        "optimizer class by import path ('torch.optim:RAdam', 'my_pkg.optim:Lion')",
    )  # fmt: skip
    args: dict[str, Any] = Field(
        {}, description="more keyword arguments of the optimizer, e.g. {betas = [0.9, 0.95]} (lr and "
        "weight_decay are [optim] keys)",
    )  # fmt: skip
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    epochs: int = Field(10, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    scheduler: str | None = Field(
        None, description="a learning-rate scheduler instead of schedule: onecycle | cosine_annealing | step | "
        "multistep | exponential | linear | polynomial | cosine_warm_restarts | a class by import path "
        "('torch.optim.lr_scheduler:OneCycleLR')",
    )  # fmt: skip
    scheduler_args: dict[str, Any] = Field(
        {}, description="its keyword arguments; total_steps, T_max (the run's length) and max_lr ([optim] lr) are "
        "filled in when it takes them and they are not given",
    )  # fmt: skip
    scheduler_interval: Literal["step", "epoch"] = Field(
        "step", description="step the scheduler after every optimizer step or after every epoch"
    )


class TrainSection(_Section):
    loss: str = Field("mse", description="mse | l1 | huber | cross_entropy | 'package.module:callable'")
    loss_args: dict[str, Any] = Field({}, description="keyword arguments of the loss, e.g. {delta = 0.5}")
    step: str | None = Field(
        None, description="your training step by import path, 'my_pkg.mod:step': step(model, batch) -> loss or "
        "(loss, {name: value}), in place of loss(model(x), y) in training and validation",
    )  # fmt: skip
    metrics: list[str] = []
    early_stopping_patience: int | None = Field(None, gt=0)
    monitor: str = "val_loss"
    progress: bool = True
    tensorboard: bool = Field(False, description='same as [log] backends = ["tensorboard"]')
    plot: bool = True
    activation_checkpointing: bool = Field(
        False, description="recompute each parameter-holding block's activations in backward instead of keeping "
        "them: less memory, about one more forward pass of compute",
    )  # fmt: skip
    offload_activations: bool = Field(
        False, description="on a GPU, keep the activations saved for backward in pinned host memory (less GPU "
        "memory, a copy each way per step); nothing to do on the CPU",
    )  # fmt: skip
    accumulate: int = Field(
        1, ge=1, description="micro-batches per optimizer step: each rank's share of a batch runs in this many "
        "pieces (activation memory / accumulate), gradients summed, one reduction; the update is unchanged",
    )  # fmt: skip
    compile: bool = Field(
        False, description="torch.compile the module the strategy runs forward on (the first step includes the "
        "compile); not under pipeline, async-shared or async-ps",
    )  # fmt: skip
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode with [train] compile = true"
    )


class LogSection(_Section):
    """``[log]``: per-step scalars and the experiment trackers they go to (``caldera.train.tracking``)."""

    every_steps: int = Field(
        0, ge=0, description="log loss, lr, throughput, data wait and grad norm every this many optimizer steps "
        "(to <run dir>/steps.jsonl and the backends); 0 = per epoch only",
    )  # fmt: skip
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="experiment trackers written by rank 0 beside metrics.jsonl: tensorboard, mlflow, wandb "
        "(pip install 'caldera[tracking]')",
    )  # fmt: skip
    system: bool = Field(
        True, description="with every_steps: also memory (process RSS and peak, host), CPU and GPU use"
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store; default the file store <run dir>/mlruns (works offline)"
    )
    mlflow_experiment: str | None = Field(None, description="MLflow experiment; default [run] name")
    wandb_project: str | None = Field(None, description="W&B project; default [run] name")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <run dir>/wandb for `wandb sync` (no internet needed)"
    )

    @field_validator("backends")
    @classmethod
    def _once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


def _seconds(value: Any) -> Any:
    """A duration as run files write it ('90s', '5m', '2h', 'HH:MM:SS' or seconds) -> seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value  # the field's own type check names what was wrong
    return parse_duration(value)  # ValueError: pydantic reports it under the key


# Seconds, written in a run file as a number or a duration string; parsed when the config is loaded.
Seconds = Annotated[float, BeforeValidator(_seconds)]


class StrategyOptions(_Section):
    """A strategy's own ``[parallel]`` keys: subclass it beside the strategy and set it as the class's ``Options``.

    ``renamed`` maps an old spelling to the key that replaced it; a run file that still uses it gets one line
    naming the new key."""

    renamed: ClassVar[dict[str, str]] = {}


class ParallelSection(_Section):
    """``[parallel]``: ``strategy``, and the options of that strategy (its class's ``Options``), flat beside it.

    The options are validated against the chosen strategy's model, found through names.py's STRATEGIES table when
    the config is loaded (a lookup, not an import statement: config stays below parallel/)."""

    # extra="allow": the keys beside ``strategy`` are the strategy's; _strategy_options validates them.
    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    strategy: str = Field(
        "single", description="single | allreduce | local-sgd | pipeline | tensor | async-shared | async-ps"
    )

    @model_validator(mode="wrap")
    @classmethod
    def _strategy_options(cls, data: Any, handler: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("strategy", "single"), str):
            return handler(data)
        name = data.get("strategy", "single")
        options = strategy_options_model(name)
        if options is None:  # an unknown name (reported with the available ones later) or no options model
            return handler(data)
        given = {k: v for k, v in data.items() if k != "strategy"}
        errors = [
            _renamed_error(options, key, value) for key, value in given.items() if key in options.renamed
        ]
        try:
            checked = options.model_validate({k: v for k, v in given.items() if k not in options.renamed})
        except ValidationError as exc:
            errors += [_option_error(options, name, err) for err in exc.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return handler({"strategy": name, **checked.model_dump()})

    @property
    def options(self) -> dict[str, Any]:
        """The chosen strategy's options (every key, defaults filled in): its constructor's keywords."""
        return dict(self.__pydantic_extra__ or {})


def strategy_options_model(name: str) -> type[StrategyOptions] | None:
    """The options model of strategy ``name`` (imports its module), or None for an unknown name."""
    if name not in STRATEGIES:
        return None
    options = getattr(STRATEGIES[name], "Options", None)
    return options if isinstance(options, type) and issubclass(options, BaseModel) else None


def _renamed_error(options: type[StrategyOptions], key: str, value: Any) -> Any:
    new = options.renamed[key]
    message = f"renamed to '{new}' (write {new} = {value!r})"
    return {
        "type": PydanticCustomError("renamed", "{text}", {"text": message}),
        "loc": (key,),
        "input": value,
    }


def _option_error(options: type[StrategyOptions], name: str, err: Any) -> Any:
    """One error of a strategy's options, worded with the strategy's name and its allowed keys or the key's help."""
    key = str(err["loc"][0]) if err["loc"] else ""
    allowed = list(options.model_fields)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, allowed, n=1)
        owners = [
            other
            for other in STRATEGIES
            if key in (getattr(strategy_options_model(other), "model_fields", {}))
        ]
        text = f"not an option of strategy '{name}'"
        text += f" (it is one of {', '.join(repr(o) for o in owners)})" if owners else ""
        text += f"; did you mean '{close[0]}'? its" if close else "; its"
        text += f" options: {', '.join(allowed)}" if allowed else " options: none"
        return {"type": PydanticCustomError("not_an_option", "{text}", {"text": text}), "loc": err["loc"],
                "input": err.get("input")}  # fmt: skip
    text = err["msg"][:1].lower() + err["msg"][1:]
    field = options.model_fields.get(key)
    if field is not None:
        help_ = [field.description] if field.description else []
        help_ += [f"default {field.default!r}"] if not field.is_required() else []
        text += f" ({'; '.join(help_)})" if help_ else ""
    return {"type": PydanticCustomError(err["type"], "{text}", {"text": text}), "loc": err["loc"],
            "input": err.get("input")}  # fmt: skip


class PrecisionSection(_Section):
    mode: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"] = "fp32"


class CheckpointSection(_Section):
    every: int | str | None = Field(
        "auto", description="'auto' (epoch ends, at least 10 minutes apart), steps (500), a time ('90s', '10m'), "
        "or 'end' (only at the end, a signal or the time limit)",
    )  # fmt: skip
    keep: int = Field(3, ge=1, description="how many recent checkpoints to keep")
    keep_best: str | None = Field(
        None, description="also keep the best checkpoint by this metric, e.g. 'val_loss'"
    )
    async_write: bool = True
    sharded: bool = Field(
        True, description="each rank writes its own shard of a sharded optimizer state (shard_optimizer), rank 0 "
        "gathers nothing; false: rank 0 writes the whole state",
    )  # fmt: skip
    time_limit: str | float | None = Field(
        None, description="wall time ('2h', '01:59:00'; 'auto': the Slurm job's end): stop with a checkpoint"
    )


class RangeSpec(_Section):
    """A numeric search range: integers when ``low`` and ``high`` are integers, else floats."""

    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = None


class TuneSection(_Section):
    trials: int = Field(20, ge=1, description="how many trials in all, spread over the ranks")
    metric: str | list[str] = Field(
        "val_loss",
        description="a per-epoch metric of the run (its best epoch scores a trial), or a list of them (and "
        "'params', the model's parameter count): a multi-objective study with a Pareto front",
    )
    direction: Literal["minimize", "maximize"] | list[Literal["minimize", "maximize"]] = Field(
        "minimize", description="one per metric when metric is a list"
    )
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna's sampler; grid: lists only")
    pruner: Literal["none", "median", "asha", "hyperband"] = Field(
        "none", description="stop hopeless trials early from their per-epoch scores (single metric only)"
    )
    pruner_args: dict[str, Any] = Field(
        default_factory=dict, description="keywords of Optuna's pruner, e.g. {n_startup_trials = 5}"
    )
    ranks_per_trial: int = Field(1, ge=1, description="ranks that train each trial together (data parallel)")
    space: dict[str, list[Any] | RangeSpec] = Field(
        default_factory=dict,
        description='dotted run-file keys: a list of choices, or {low, high, log, step}, e.g. "optim.lr"',
    )

    @model_validator(mode="after")
    def _objectives(self) -> TuneSection:
        if len(self.metrics) != len(self.directions):
            raise ValueError(f"{len(self.metrics)} metrics but {len(self.directions)} directions; give one "
                             "direction per metric")  # fmt: skip
        if len(self.metrics) > 1 and self.pruner != "none":
            raise ValueError("pruning needs a single metric (Optuna prunes single-objective studies only); "
                             'set pruner = "none" or one metric')  # fmt: skip
        return self

    @property
    def metrics(self) -> list[str]:
        """The metrics, as a list (one for a single-objective study)."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def directions(self) -> list[str]:
        """One direction per metric (a lone direction serves every metric)."""
        if isinstance(self.direction, str):
            return [self.direction] * len(self.metrics)
        return list(self.direction)


class Config(_Section):
    """A whole run file."""

    run: RunSection = RunSection()
    model: ModelSection
    data: DataSection
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    # A factory: building the default validates it, which looks up strategy 'single' (imports parallel/).
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    precision: PrecisionSection = PrecisionSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    tune: TuneSection | None = None

    @property
    def run_dir(self) -> Path:
        """The run directory: ``[run] dir`` or runs/<name>."""
        return Path(self.run.dir or f"runs/{self.run.name}")


# -- loading ----------------------------------------------------------------------------------------------------


def load_config(
    source: str | Path | dict[str, Any],
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Load, override (``["optim.lr=3e-4", ...]``), set dotted keys to Python ``values`` (``{"optim.lr": 3e-4}``)
    and validate a run file or dict; raise ``ConfigError``."""
    where = "config"
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        where = str(path)
        raw = _read(path)
    for item in overrides or []:
        _apply_override(raw, item)
    for dotted, value in (values or {}).items():
        _set_dotted(raw, dotted, value, f"{where}: {dotted!r}")
    _check_plain(raw, [], where)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, where)) from None
    _check_references(cfg, where)
    return cfg


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: file not found; check the path (examples live in examples/*.toml)")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; give the path of a run file (.toml or .yaml)")
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use a .toml or .yaml file")
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_RUN_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the run file ({exc.strerror or exc}); check its permissions"
        ) from None
    if len(blob) > MAX_RUN_FILE_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_RUN_FILE_BYTES >> 20} MiB, which no run file is; check the path"
        )
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); give a TOML or YAML run file"
        ) from None
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "TOML"
    try:
        data = (_yaml_load(text) or {}) if kind == "YAML" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {_first_line(exc)}") from None
    except RecursionError:  # brackets nested thousands deep: the parsers recurse
        raise ConfigError(
            f"{path}: not valid {kind}: nested too deeply; a run file needs a few levels"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections such as [model] and [data] at the top level")
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*name`` repeats a node, and nested repeats of repeats (a 'billion laughs' file
    of a few hundred bytes) expand to more values than memory holds once validated or printed."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in a run file; write the value out",
                event.start_mark,
            )  # fmt: skip
        return super().compose_node(parent, index)


def _yaml_load(text: str) -> Any:
    """Parse YAML with the safe loader, refusing aliases."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _first_line(exc: Exception, limit: int = 300) -> str:
    """The gist of a parser's error on one line: YAML's problem and position, without its code excerpt."""
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem and mark is not None:
        text = f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    else:
        text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_plain(value: Any, path: list[str], where: str) -> None:
    """Refuse values JSON cannot hold (YAML's !!binary and !!set, TOML's dates): the run directory records its
    config as JSON, and predict and serve read that record back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"{where}: key {key!r} under '{'.'.join(path) or 'the top level'}' is not a string; "
                    f"quote it ('{key}')"
                )
            _check_plain(item, [*path, key], where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, [*path, str(i)], where)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        key = ".".join(path)
        key = key if key.isprintable() else repr(key)[1:-1]
        raise ConfigError(
            f"{where}: '{key}' is a {type(value).__name__}, which the run's JSON record cannot hold; write it "
            "as a string, a number, a list or a table"
        )


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML (numbers, lists, strings)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, for example --set optim.lr=3e-4")
    dotted, value = item.split("=", 1)
    try:
        parsed = _yaml_load(value)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({_first_line(exc, 120)}); quote a string "
            "(--set section.key='\"text\"') or write a number or a list such as [1, 2]"
        ) from None
    _set_dotted(raw, dotted.strip(), parsed, f"--set {item!r}")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, label: str) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted`` "a.b.c", creating sections; ``label`` starts an error."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {key!r} is not a section")
    node[leaf] = value


def _explain(exc: ValidationError, where: str) -> str:
    lines = [f"{where}: {exc.error_count()} problem(s) in the run file:"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        key = key if key.isprintable() else repr(key)[1:-1]  # a key with a newline must not split the block
        section = loc[0] if loc else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}'. {_suggest(loc)}")
        elif err["type"] == "missing":
            lines.append(f"  - missing key '{key}': add it under [{section}]{_describe(loc)}")
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."  # a megabyte of value would bury the message
            # A strategy option's message is worded already (names and values keep their case).
            msg = err["msg"] if loc[:1] == ["parallel"] else err["msg"].lower()
            lines.append(f"  - '{key}' = {got}: {msg}{_describe(loc)}")
    return "\n".join(lines)


def _section_model(section: str) -> type[BaseModel] | None:
    field = Config.model_fields.get(section)
    if field is None:
        return None
    # An optional section (tune: TuneSection | None) is annotated as a union: the model is its class member.
    kinds = [field.annotation, *getattr(field.annotation, "__args__", ())]
    return next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)


# Names people carry over from other frameworks, mapped to ours.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "max_epochs": "epochs", "batch": "batch_size",
            "optimizer": "name", "scheduler": "schedule", "lr_schedule": "schedule", "workers": "num_workers",
            "precision": "mode", "dtype": "mode", "backend": "strategy"}  # fmt: skip


def _suggest(loc: list[str]) -> str:
    if len(loc) == 1:
        allowed = list(Config.model_fields)
    else:
        model = _section_model(loc[0])
        allowed = list(model.model_fields) if model else []
    alias = _ALIASES.get(loc[-1])
    close = [alias] if alias in allowed else difflib.get_close_matches(loc[-1], allowed, n=1)
    hint = f"Did you mean '{close[0]}'? " if close else ""
    return f"{hint}Allowed here: {', '.join(allowed)}"


def _describe(loc: list[str]) -> str:
    model = _section_model(loc[0]) if loc else None
    if model is None or len(loc) < 2 or loc[1] not in model.model_fields:
        return ""
    field = model.model_fields[loc[1]]
    parts = []
    if field.description:
        parts.append(field.description)
    if not field.is_required():
        parts.append(f"default {field.default!r}")
    return f" ({'; '.join(parts)})" if parts else ""


# -- trust: code named by a run directory -----------------------------------------------------------------------
# A run directory travels between people (a shared filesystem, a download); its config names code by import path,
# and importing a module runs it. So what a run directory names is imported only when the user says so: built-in
# names (never containing ':') always resolve; 'pkg.mod:Name' only with trust_code (--trust-code) or when the user
# gave that same path for that key (--set model.name=my_pkg:Net). Run files given to train/check/tune are the
# user's own and stay trusted. See docs/security.md.


def code_refs(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Every import path ('pkg.mod:Name') a run file's dict names for ``resolve``, as (dotted key, path)."""

    def get(dotted: str) -> Any:
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    refs = []
    for key in ("model.name", "data.source", "data.args.transform", "train.loss", "train.metrics", "train.step",
                "optim.name", "optim.scheduler"):  # fmt: skip
        value = get(key)
        for item in value if isinstance(value, list) else [value]:
            # A name without ':' is a built-in or an error in resolve(); it never reaches importlib.
            if isinstance(item, str) and ":" in item:
                refs.append((key, item))
    return refs


def check_trusted(raw: dict[str, Any], run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  trust_code: bool = False, keys: tuple[str, ...] | None = None) -> None:  # fmt: skip
    """Raise UntrustedCode for an import path (under ``keys``) in a run directory's ``raw`` config not vouched for."""
    # Vouched for: trust_code, or the user's own --set of that path for that key (overrides, applied to raw).
    if trust_code:
        return
    given: dict[str, Any] = {}
    for item in overrides:
        _apply_override(given, item)
    vouched = set(code_refs(given))
    for key, path in code_refs(raw):
        if (keys is None or key in keys) and (key, path) not in vouched:
            raise UntrustedCode(
                f"{run_dir}: {key} = {path!r} is code to import, not a built-in name; refused because a run "
                "directory may come from someone else and importing runs its code. If you trust who wrote it, "
                "pass --trust-code (Python: trust_code=True)"
            )


def read_run_dir(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), trust_code: bool = False,
                 keys: tuple[str, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """A finished run's config.resolved.json with ``overrides``, through ``check_trusted`` before any import."""
    run_dir = Path(run_dir)
    resolved = run_dir / "config.resolved.json"
    missing = [f for f in (resolved, run_dir / "model.pt") if not f.is_file()]
    # Weights written shard-wise (tensor parallel, ZeRO-3) stand for model.pt.
    if (run_dir / WEIGHT_SHARDS / "layout.json").is_file():
        missing = [f for f in missing if f.name != "model.pt"]
    if missing:
        raise ConfigError(
            f"{run_dir} has no {' or '.join(f.name for f in missing)}: give the run directory of a finished "
            "`caldera train` run (its [run] dir)"
        )
    try:
        raw = json.loads(resolved.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"{resolved}: not valid JSON ({exc}); give the run directory of a finished run"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{resolved}: expected sections such as model and data at the top level")
    _own_parallel_keys(raw)
    for item in overrides:
        _apply_override(raw, item)
    check_trusted(raw, run_dir, overrides, trust_code, keys)
    return raw


def _own_parallel_keys(raw: dict[str, Any]) -> None:
    """Keep the recorded strategy's own ``[parallel]`` keys, under their current names: a run directory written
    before ``[parallel]`` was per strategy records every strategy's keys (the others had no effect on it)."""
    parallel = raw.get("parallel")
    name = parallel.get("strategy", "single") if isinstance(parallel, dict) else None
    options = strategy_options_model(name) if isinstance(name, str) else None
    if options is None or not isinstance(parallel, dict):
        return
    for old, new in options.renamed.items():
        if old in parallel and new not in parallel:
            parallel[new] = parallel.pop(old)
    raw["parallel"] = {k: v for k, v in parallel.items() if k == "strategy" or k in options.model_fields}


def _check_name(ref: str, table: Builtins, key: str) -> None:
    """Check a name a config gives: a built-in is known without importing it; an import path must import."""
    if ref not in table:
        resolve(ref, table, key)


def _zero2_problem(options: dict[str, Any], precision: str) -> str | None:
    """What keeps ZeRO-2 (``shard_gradients``) from these ``[parallel]`` options, with the fix; None if nothing."""
    if not options.get("shard_gradients"):
        return None
    if not options.get("shard_optimizer"):
        return "shards the optimizer too (each rank steps the range of gradients it keeps): add shard_optimizer = true"
    if options.get("reducer", "auto") == "shm":
        return "reduce-scatters through MPI: use reducer = 'auto' or 'mpi', not 'shm'"
    if options.get("grad_comm", "fp32") != "fp32":
        return "does not combine with 16-bit grad_comm yet: use grad_comm = 'fp32' or shard_gradients = false"
    if precision == "fp16-mixed":
        return (
            "does not combine with [precision] mode = 'fp16-mixed' yet (its loss scaler reads whole gradients): "
            "use 'bf16-mixed' or 'fp32', or shard_gradients = false"
        )
    return None


def _zero3_problem(cfg: Config) -> str | None:
    """What keeps ZeRO-3 (``shard_params``) from this config, with the fix; None if nothing."""
    options = cfg.parallel.options
    if not options.get("shard_params"):
        return None
    if not (options.get("shard_gradients") and options.get("shard_optimizer")):
        return "shards the gradients and the optimizer too: add shard_gradients = true and shard_optimizer = true"
    if cfg.train.compile:
        return "gathers blocks in hooks, eagerly: set [train] compile = false"
    if cfg.train.activation_checkpointing:
        return "does not combine with [train] activation_checkpointing yet: set it false, or shard_params = false"
    if not cfg.checkpoint.sharded:
        return "writes each rank's ranges into its own checkpoint file: set [checkpoint] sharded = true"
    if cfg.model.weights:
        return "builds the model without storage and cannot start from [model] weights yet: remove them"
    if cfg.precision.mode not in ("fp32", "bf16-mixed"):
        return "keeps fp32 parameters: use [precision] mode = 'fp32' or 'bf16-mixed'"
    return None


def _check_references(cfg: Config, where: str) -> None:
    try:
        _check_name(cfg.model.name, MODELS, "[model] name")
        _check_name(cfg.data.source, SOURCES, "[data] source")
        _check_name(cfg.train.loss, LOSSES, "[train] loss")
        for name in cfg.train.metrics:
            _check_name(name, METRICS, "[train] metrics")
        if cfg.train.step is not None:
            if ":" not in cfg.train.step:
                raise ConfigError(f"[train] step = {cfg.train.step!r}: give your step function by import path, "
                                  "such as 'my_pkg.steps:step'")  # fmt: skip
            _check_name(cfg.train.step, {}, "[train] step")  # type: ignore[arg-type]
        _check_name(cfg.optim.name, OPTIMIZERS, "[optim] name")
        if cfg.optim.scheduler is not None:
            _check_name(cfg.optim.scheduler, SCHEDULERS, "[optim] scheduler")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if cfg.optim.scheduler is not None and (cfg.optim.schedule != "constant" or cfg.optim.warmup_steps):
        raise ConfigError(
            f"{where}: [optim] scheduler = {cfg.optim.scheduler!r} replaces schedule and warmup_steps; remove "
            "those two (or the scheduler)"
        )
    try:
        parse_interval(cfg.checkpoint.every)
    except ValueError as exc:
        raise ConfigError(f"{where}: [checkpoint] {exc}") from None
    try:
        check_time_limit(cfg.checkpoint.time_limit)
    except ValueError as exc:
        raise ConfigError(f"{where}: [checkpoint] time_limit: {exc}") from None
    try:
        hang = parse_duration(cfg.run.hang_timeout)
        if hang is not None and hang < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{where}: [run] hang_timeout = {cfg.run.hang_timeout!r}: use seconds (600), a time ('30m', '1h') "
            "or 0 to turn the hang watchdog off"
        ) from None
    if cfg.parallel.strategy not in STRATEGIES:
        available = sorted(STRATEGIES)
        close = difflib.get_close_matches(cfg.parallel.strategy, available, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"{where}: [parallel] strategy = {cfg.parallel.strategy!r} is not known; {hint}"
            f"available: {', '.join(available)}"
        )
    if cfg.parallel.options.get("shard_optimizer") and cfg.precision.mode == "bf16-true":
        raise ConfigError(
            f"{where}: [parallel] shard_optimizer does not combine with [precision] mode = 'bf16-true' yet (its "
            "optimizer steps fp32 master copies of the weights); use 'bf16-mixed', 'fp16-mixed' or 'fp32', or "
            "shard_optimizer = false"
        )
    zero2 = _zero2_problem(cfg.parallel.options, cfg.precision.mode)
    if zero2:
        raise ConfigError(f"{where}: [parallel] shard_gradients = true {zero2}")
    zero3 = _zero3_problem(cfg)
    if zero3:
        raise ConfigError(f"{where}: [parallel] shard_params = true {zero3}")
    problem = unsupported(cfg.parallel.strategy, cfg.precision.mode)
    if problem:
        raise ConfigError(f"{where}: [parallel] {problem}")
    if cfg.train.compile and cfg.parallel.strategy in NOT_COMPILED:
        raise ConfigError(f"{where}: [train] compile: {NOT_COMPILED[cfg.parallel.strategy]}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (``{"data.args.path": ...}``), to name the keys that differ between two
    configs; an empty table is a value of its own."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
