"""Experiment tracking: per-step scalars to ``steps.jsonl`` and to TensorBoard, MLflow or W&B (``[log]``).

Every rank computes the step's numbers together at the interval (one small ``allgather``); rank 0 alone writes.
A backend is a small class (``open``/``log``/``close``) whose package is imported only when chosen. Its run
identity (MLflow run id, W&B id, TensorBoard directory) is kept in ``<run dir>/tracking.json``, so a resumed or
requeued run continues the same run, with steps numbered by the global optimizer step so curves continue.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import re
import resource
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from caldera.config import LogSection, flatten
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.train.callbacks import Callback

if TYPE_CHECKING:
    from caldera.train.trainer import Trainer

# The package each backend imports (what `pip install 'caldera[tracking]'` brings).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
STEPS_FILE, STATE_FILE = "steps.jsonl", "tracking.json"


class Backend(Protocol):
    """One experiment tracker, written by rank 0."""

    name: str

    def open(self, run_dir: Path, saved: Mapping[str, Any] | None) -> dict[str, Any]:
        """Start a run, or continue the one ``saved`` describes (None: a new run); return what identifies it."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record scalars at the global optimizer step ``step``."""

    def flush(self) -> None:
        """Make what was logged readable now (at each epoch end)."""

    def close(self, finished: bool) -> None:
        """Flush and end the run: ``finished``, or stopped early (a time limit, a signal, an error)."""


class TensorBoardBackend:
    """Event files under ``<run dir>/tensorboard`` (a resumed run adds a file to the same directory)."""

    name = "tensorboard"

    def open(self, run_dir: Path, saved: Mapping[str, Any] | None) -> dict[str, Any]:
        """Open a SummaryWriter on the run's (or the saved) log directory."""
        from torch.utils.tensorboard import SummaryWriter

        log_dir = (saved or {}).get("log_dir") or "tensorboard"  # relative: the run directory may move
        self.writer = SummaryWriter(str(run_dir / log_dir))
        return {"log_dir": log_dir}

    def log(self, values: Mapping[str, float], step: int) -> None:
        """One scalar per key."""
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Write the buffered events (the writer otherwise waits up to two minutes)."""
        self.writer.flush()

    def close(self, finished: bool) -> None:
        """Flush and close the event file."""
        self.writer.close()


class MLflowBackend:
    """An MLflow run in a tracking store: by default the file store ``<run dir>/mlruns`` (no server, offline)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None, experiment: str, params: Mapping[str, Any]) -> None:
        self.tracking_uri, self.experiment, self.params = tracking_uri, experiment, params

    def open(self, run_dir: Path, saved: Mapping[str, Any] | None) -> dict[str, Any]:
        """Create the run (with the run file's settings as params), or set the saved one running again."""
        given = (saved or {}).get("tracking_uri") or self.tracking_uri
        uri = given or (run_dir / "mlruns").resolve().as_uri()  # recorded as None: the run directory may move
        if given is None:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a directory of plain files is
            # what a compute node without a server (and a parallel file system, where SQLite locks badly) needs.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if saved and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment, run_name=self.experiment).info.run_id
            # Params are immutable in MLflow: set once, when the run is created (a resume may change epochs).
            params = [Param(_mlflow_key(k), str(v)[:500]) for k, v in self.params.items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        return {"tracking_uri": given, "run_id": self.run_id}

    def log(self, values: Mapping[str, float], step: int) -> None:
        """One metric point per key, stamped with ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        )

    def flush(self) -> None:
        """Nothing: every point is written when logged."""

    def close(self, finished: bool) -> None:
        """Mark the run FINISHED, or KILLED when stopped early (a resume sets it RUNNING again)."""
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class WandbBackend:
    """A W&B run, offline by default (files under ``<run dir>/wandb``; ``wandb sync`` uploads them later)."""

    name = "wandb"

    def __init__(self, project: str, mode: str, name: str, config: Mapping[str, Any]) -> None:
        self.project, self.mode, self.run_name, self.config = project, mode, name, config

    def open(self, run_dir: Path, saved: Mapping[str, Any] | None) -> dict[str, Any]:
        """Start the run with a fixed id, or resume the saved id (``resume="allow"``)."""
        import wandb

        run_id = (saved or {}).get("id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=self.project, name=self.run_name, id=run_id, resume="allow", mode=self.mode,
                              dir=str(run_dir), config=dict(self.config), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))  # fmt: skip
        return {"id": run_id, "project": self.project}

    def log(self, values: Mapping[str, float], step: int) -> None:
        """One row of scalars at ``step``."""
        self.run.log(dict(values), step=step)

    def flush(self) -> None:
        """Nothing: W&B's own process writes as it goes."""

    def close(self, finished: bool) -> None:
        """Finish the run (offline: its files are complete); a stopped one with a non-zero exit code."""
        self.run.finish(exit_code=0 if finished else 1)


class Tracker(Callback):
    """``[log]``: per-step scalars every ``every_steps`` steps, epoch metrics, and the backends (rank 0 writes)."""

    def __init__(self, settings: LogSection, name: str = "run", config: Mapping[str, Any] | None = None,
                 extra_backends: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.every, self.system = settings.every_steps, settings.system
        names = list(dict.fromkeys([*settings.backends, *extra_backends]))
        missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
        if missing:
            raise ConfigError(
                f"[log] backends: {', '.join(missing)} needs the {', '.join(PACKAGES[n] for n in missing)} package; "
                "pip install 'caldera[tracking]' (or remove it from [log] backends)"
            )
        params = flatten(config or {})
        factories = {
            "tensorboard": TensorBoardBackend,
            "mlflow": lambda: MLflowBackend(
                settings.mlflow_tracking_uri, settings.mlflow_experiment or name, params
            ),
            "wandb": lambda: WandbBackend(settings.wandb_project or name, settings.wandb_mode, name, params),
        }
        self.backends: list[Backend] = [factories[n]() for n in names]
        self._file: Any = None
        self._open: list[Backend] = []
        self._logged_up_to = 0  # steps already sent to the backends by an earlier attempt of this run

    # -- the callback -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer) -> None:
        """Rank 0: trim steps.jsonl to the resumed step, open or continue the backends' runs."""
        self._window = _Window()
        self._arm(trainer)
        if not trainer.world.is_main or trainer.run_dir is None:
            return
        run_dir = Path(trainer.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        steps = run_dir / STEPS_FILE
        rows = _read_rows(steps)
        # Steps past the checkpoint were trained by an attempt that died: they are trained again now. The file
        # keeps the new rows; the backends, which cannot take a point back, keep the old ones (same step, same
        # number when the resume is exact) and are not sent them twice.
        self._logged_up_to = max((r["step"] for r in rows), default=0) if trainer.resume else 0
        atomic_write_text(
            steps, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= trainer.global_step)
        )
        self._file = steps.open("a", buffering=1)  # line-buffered: each row reaches the file whole
        state_file = run_dir / STATE_FILE
        state = json.loads(state_file.read_text()) if trainer.resume and state_file.is_file() else {}
        checkpointer = trainer.checkpointer
        state["run_id"] = checkpointer.run_id if checkpointer is not None else state.get("run_id")
        for backend in self.backends:
            state[backend.name] = backend.open(run_dir, state.get(backend.name))
            self._open.append(backend)
            atomic_write_text(state_file, json.dumps(state, indent=2))  # each id as soon as it exists
        atexit.register(self._close)  # a time-limit stop or an error ends fit without on_fit_end

    def on_step_end(self, trainer: Trainer) -> None:
        """At the interval: gather the step's numbers (collective), write them on rank 0."""
        self._window.samples += trainer.last_step[2]
        if self.every and trainer.global_step % self.every == 0:
            row = self._window.measure(trainer, self.system)
            if row is not None:
                if self._file is not None:
                    self._file.write(json.dumps(row) + "\n")
                self._send({k: v for k, v in row.items() if k not in ("step", "epoch")}, row["step"])
        self._arm(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        """The epoch's metrics, at the epoch's last global step, under ``epoch/``."""
        self._send({f"epoch/{k}": v for k, v in logs.items() if k != "epoch"}, trainer.global_step)
        for backend in self._open:
            backend.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        """Close the file and finish the backends' runs."""
        atexit.unregister(self._close)
        self._close(finished=True)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _arm(self, trainer: Trainer) -> None:
        # The strategy measures the gradient norm only on the steps that are logged (it costs a pass).
        trainer.strategy.measure_grad_norm = bool(self.every) and (trainer.global_step + 1) % self.every == 0

    def _send(self, values: Mapping[str, Any], step: int) -> None:
        if step <= self._logged_up_to:
            return
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for backend in self._open:
            backend.log(finite, step)

    def _close(self, finished: bool = False) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        while self._open:
            self._open.pop().close(finished)


class _Window:
    """What happened since the last logged step: samples, wall time, data wait, CPU time."""

    def __init__(self) -> None:
        self.samples = 0  # global samples of the steps since the last logged one
        self.meter: Any = None
        self.t0 = time.perf_counter()
        self.wait0 = 0.0
        self.cpu0 = _cpu_seconds()

    def measure(self, trainer: Trainer, system: bool) -> dict[str, Any] | None:
        """The logged row (rank 0; None elsewhere). Collective: every rank calls it at the same step."""
        loss, n_local, _ = trainer.last_step
        now = time.perf_counter()
        stats = trainer._meter.stats  # reset at each epoch's start: a new object
        wait = stats.wait_s + stats.first_wait_s
        waited = wait - (self.wait0 if stats is self.meter else 0.0)
        seconds = max(now - self.t0, 1e-9)
        loss_value = float(loss)  # the one device sync of the interval
        finite = math.isfinite(loss_value)
        mine = [loss_value * n_local if finite else 0.0, n_local if finite else 0, waited / seconds]
        if system:
            rss = _rss_gb()  # the kernel updates the peak lazily: never report a peak below the present
            mine += [rss, max(rss, _peak_rss_gb()), _gpu_peak_gb(trainer.world.device)]
        everyone = trainer.world.comm.allgather(mine)
        row: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.epoch + 1}
        seen = sum(r[1] for r in everyone)
        row["train/loss"] = sum(r[0] for r in everyone) / seen if seen else None
        row["train/lr"] = trainer.optimizer.param_groups[0]["lr"]
        row["train/samples_per_s"] = self.samples / seconds
        row["train/data_wait"] = max(
            r[2] for r in everyone
        )  # the slowest rank's share of time waiting for data
        norm = trainer.strategy.grad_norm()
        if norm is not None:
            row["train/grad_norm"] = norm
        if system:
            cpu = _cpu_seconds()
            row["system/rss_gb"] = max(r[3] for r in everyone)  # the largest rank's
            row["system/peak_rss_gb"] = max(r[4] for r in everyone)
            row["system/host_mem_used_gb"] = _host_used_gb()  # rank 0's node
            row["system/cpu_percent"] = 100 * (cpu - self.cpu0) / seconds  # rank 0's process; 100 = one core
            self.cpu0 = cpu
            if trainer.world.device.type == "cuda":
                row["system/gpu_mem_peak_gb"] = max(r[5] for r in everyone)
                util = _gpu_util(trainer.world.device)
                if util is not None:
                    row["system/gpu_util_percent"] = util  # rank 0's GPU
        self.samples, self.t0, self.wait0, self.meter = 0, now, wait, stats
        if not trainer.world.is_main:
            return None
        return {k: v if v is None or math.isfinite(v) else None for k, v in row.items()}  # JSON has no NaN


# -- system measurements (stdlib and /proc: no extra package) --------------------------------------------------


def _rss_gb() -> float:
    """This process's resident memory now (Linux /proc; elsewhere its peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return _peak_rss_gb()


def _peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _host_used_gb() -> float | None:
    """The node's memory in use (total - available), from /proc/meminfo; None where there is none."""
    try:
        info = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
        )
        kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
        return kib / 2**20
    except (OSError, KeyError, ValueError):
        return None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _gpu_peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _gpu_util(device: torch.device) -> float | None:
    try:  # needs pynvml (or amdsmi); without it there is no utilisation to report
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - any failure of an optional reading means "not available"
        return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """steps.jsonl's rows; a line cut short by a kill is dropped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _mlflow_key(key: str) -> str:
    # MLflow names allow letters, digits, _ - . space / only.
    return re.sub(r"[^\w\-. /]", "_", key)
