"""The run directory: every file a run writes or a later command reads, by name, each write atomic.

Rank 0 writes; readers (``caldera predict``, ``serve``, ``Surrogate.from_run``, fine-tuning) come through
``read_config`` (the trust check of ``caldera.config.read_run_dir``) and ``load_weights`` (tensors only).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from caldera.config import Config, read_run_dir
from caldera.errors import ConfigError
from caldera.io import atomic_write, atomic_write_text
from caldera.names import WEIGHT_SHARDS
from caldera.parallel.tensor import LAYOUT, open_sharded_weights


class RunDir:
    """The files of one run directory: config copies, weights, summary, identity, metrics and plots."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config_resolved(self) -> Path:
        """The resolved config (every default filled in): what predict, serve and a resume rebuild the run from."""
        return self.path / "config.resolved.json"

    @property
    def weights(self) -> Path:
        """The final weights (a plain state_dict: ``torch.load(weights_only=True)`` reads it)."""
        return self.path / "model.pt"

    @property
    def weight_shards(self) -> Path:
        """The final weights shard-wise, where the strategy wrote them so: ``layout.json``, ``shared.pt`` and one
        file per rank: tensor parallel's ``tp-NNNNN.pt`` (``caldera.parallel.tensor``), ZeRO-3's ``zero3-NNNNN.pt``
        (``caldera.parallel.fsdp``)."""
        return self.path / WEIGHT_SHARDS

    @property
    def summary(self) -> Path:
        """What the run did, in a few numbers, and its last metrics."""
        return self.path / "summary.json"

    @property
    def identity(self) -> Path:
        """Who wrote this directory's checkpoints (run id, config hash) and where this process began."""
        return self.path / "run.json"

    @property
    def checkpoints(self) -> Path:
        """The checkpoint directory (caldera.checkpoint owns what is inside)."""
        return self.path / "checkpoints"

    def plot(self, name: str) -> Path:
        """Where the figure ``name`` (learning_curve, predictions, online) goes."""
        return self.path / f"{name}.png"

    def missing(self) -> list[str]:
        """The files a finished run must have for its model to be rebuilt, that this directory lacks."""
        missing = [p.name for p in (self.config_resolved, self.weights) if not p.is_file()]
        return [m for m in missing if m != self.weights.name or not (self.weight_shards / LAYOUT).is_file()]

    # -- writing (rank 0) ---------------------------------------------------------------------------------------
    def save_config(self, cfg: Config, config_path: str | Path | None = None) -> None:
        """Keep the config file as given (``config.toml``/``.yaml``) and the resolved config beside it."""
        self.path.mkdir(parents=True, exist_ok=True)
        if config_path is not None:
            data = Path(config_path).read_bytes()
            atomic_write(self.path / f"config{Path(config_path).suffix}", lambda f: f.write(data))
        atomic_write_text(self.config_resolved, json.dumps(cfg.model_dump(), indent=2))

    def write_identity(self, identity: dict[str, Any]) -> Path:
        """Write run.json."""
        return atomic_write_text(self.identity, json.dumps(identity, indent=2))

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write summary.json."""
        return atomic_write_text(self.summary, json.dumps(summary, indent=2))

    def save_weights(self, model: torch.nn.Module) -> Path:
        """Save the model's state_dict to model.pt; plain ``torch.load`` reads it back."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = atomic_write(self.weights, lambda f: torch.save(state, f))
        shutil.rmtree(self.weight_shards, ignore_errors=True)  # an earlier run's shard-wise weights
        return path

    def metrics(self, rows: list[dict[str, float]] | None = None) -> MetricsLog:
        """The metrics files, starting from ``rows`` (a resumed run's history)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return MetricsLog(self.path, rows)

    # -- reading ------------------------------------------------------------------------------------------------
    def read_config(self, overrides: list[str] | tuple[str, ...] = (), trust_code: bool = False,
                    keys: tuple[str, ...] | None = None) -> dict[str, Any]:  # fmt: skip
        """The resolved config with ``overrides``, refused if it names code to import that nobody vouched for."""
        return read_run_dir(self.path, overrides, trust_code, keys)

    def load_weights(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load model.pt into ``model`` (tensors only: nothing in the file executes), or the shard-wise weights
        joined into the whole model when the run wrote those instead (ZeRO-3's memory-mapped, a tensor at a time)."""
        if not self.weights.is_file() and (self.weight_shards / LAYOUT).is_file():
            return load_state(model, open_sharded_weights(self.weight_shards), str(self.weight_shards))
        return load_weights(model, self.weights, str(self.weights))


def git_commit(start: str | Path) -> str | None:
    """The commit checked out in the git repository holding ``start``, read from its .git files (no git process,
    no network: cheap enough for every run), or None outside a repository. Uncommitted changes are not seen."""
    try:
        start = Path(start).resolve()
        for folder in (start, *start.parents):
            git = folder / ".git"
            if git.is_file():  # a worktree or submodule: "gitdir: <its git directory>"
                text = git.read_text().strip()
                git = (folder / text.removeprefix("gitdir:").strip()).resolve()
            if git.is_dir():
                break
        else:
            return None
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None  # a detached HEAD names the commit itself
        ref = head.removeprefix("ref:").strip()
        common = git / "commondir"  # a worktree keeps its branches in the main repository's git directory
        common = (git / common.read_text().strip()).resolve() if common.is_file() else git
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else ():
            if line.endswith(f" {ref}"):
                return line.split()[0]
    except OSError:
        pass
    return None


def mismatch(own: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """The names where ``state`` does not fit a model's own state_dict (missing, unexpected, other shape), in the
    model's order, then the file's."""
    return [n for n in dict.fromkeys([*own, *state])
            if n not in own or n not in state or tuple(own[n].shape) != tuple(state[n].shape)]  # fmt: skip


def load_weights(model: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    """Load a weights file into ``model`` (tensors only); one that does not fit is a ConfigError naming ``what``
    and the names that differ, not torch's traceback."""
    return load_state(model, torch.load(path, map_location="cpu", weights_only=True), what)


def load_state(model: torch.nn.Module, state: Mapping[str, Any], what: str) -> torch.nn.Module:
    """Load a state_dict into ``model``; one that does not fit is a ConfigError naming ``what`` and the names."""
    own = model.state_dict()
    bad = mismatch(own, state)
    if bad:
        missing, unexpected = [k for k in bad if k not in state], [k for k in bad if k not in own]
        wrong = [k for k in bad if k in own and k in state]
        raise ConfigError(
            f"{what} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes "
            f"{wrong[:5]}; the [model] name and args must match the run that wrote it"
        )
    model.load_state_dict(state)
    return model


class MetricsLog:
    """One JSON line per record in metrics.jsonl, and metrics.csv in step with it (both rewritten atomically)."""

    def __init__(self, run_dir: Path, rows: list[dict[str, float]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.rows = list(rows or [])
        # A resumed run starts from the checkpoint's history: rewrite the file so no epoch appears twice.
        self._write_jsonl()

    def append(self, row: dict[str, float]) -> None:
        """Record one epoch's (or round's) metrics."""
        self.rows.append(row)
        self._write_jsonl()
        self._write_csv()

    def update_last(self, values: dict[str, float]) -> None:
        """Add ``values`` to the newest row (metrics measured after it was recorded) and rewrite both files."""
        self.rows[-1] = {**self.rows[-1], **values}
        self._write_jsonl()
        self._write_csv()

    def _write_jsonl(self) -> None:
        atomic_write_text(self.run_dir / "metrics.jsonl", _lines(self.rows))

    def _write_csv(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())


def _lines(rows: Iterable[dict[str, float]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)
