"""model.json, the card beside the exported artefacts: what goes in and out, in which units, how it was checked,
and what it came from (resolved config and hash, a fingerprint of the training data, metrics, versions, commit)."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from caldera.config import Config
from caldera.data.normalize import STATS_FILE
from caldera.export.physical import data_parts
from caldera.train.run import config_hash
from caldera.train.rundir import RunDir

CARD = "model.json"
CARD_FORMAT = 1


def tensor_spec(name: str, t: torch.Tensor) -> str:
    """``name:dtype:-1,d1,d2`` (the contract's syntax; the batch axis is -1, dynamic)."""
    dims = ",".join(str(d) for d in (-1, *t.shape[1:]))
    return f"{name}:{str(t.dtype).removeprefix('torch.')}:{dims}"


def output_names(module: torch.nn.Module, out: Any) -> list[str]:
    """``y`` for one output; the model's own ``output_names`` or y0, y1... for a tuple."""
    if torch.is_tensor(out):
        return ["y"]
    own = getattr(getattr(module, "model", module), "output_names", None)  # the model's, inside the wrapper
    return list(own) if own and len(own) == len(out) else [f"y{i}" for i in range(len(out))]


def io_specs(module: torch.nn.Module, example: torch.Tensor, out: Any) -> tuple[list[str], list[str]]:
    """The input and output specs of the physical-units module on ``example``."""
    outs = [out] if torch.is_tensor(out) else list(out)
    return [tensor_spec("x", example)], [tensor_spec(n, o) for n, o in zip(output_names(module, out), outs)]


def provenance(cfg: Config) -> dict[str, str]:
    """String metadata for the artefacts (AOTInductor, safetensors, ONNX): the config hash, the data source and
    each scalar argument of it as ``caldera.data.<name>`` (e.g. ``caldera.data.steps``, the span a heat surrogate
    replaces), so a native caller reads what the model was trained on without parsing the card."""
    meta = {"caldera.config_hash": config_hash(cfg), "caldera.data.source": str(cfg.data.source)}
    for key, value in (cfg.data.args or {}).items():
        if isinstance(value, (str, int, float, bool)):
            meta[f"caldera.data.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _spec_dict(spec: str, variables: list[dict[str, Any]] | None) -> dict[str, Any]:
    name, dtype, dims = spec.split(":")
    return {"name": name, "dtype": dtype, "shape": [int(d) for d in dims.split(",")], "dynamic_axes": [0],
            "variables": variables}  # fmt: skip


def variables(dataset: Dataset, which: str) -> list[dict[str, Any]] | None:
    """Per variable stacked along axis 1: its name, channels, kind and units (where the file records them)."""
    first = data_parts(dataset)[0]
    layout = getattr(first, f"{which}_layout", None)
    if layout is None:
        return None
    reader = first.reader
    return [{"variable": v, "channels": k, "kind": kind, "units": reader.units(v)} for v, k, kind in layout()]


def data_fingerprint(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """A sha256 over what identifies the training data: source and args, each named file's path, size and
    mtime, and the normalisation statistics the run kept."""
    files = []
    for value in _strings(cfg.data.args):
        path = Path(value)
        if path.exists():
            st = path.stat()
            files.append({"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime})
    stats = run_dir / STATS_FILE
    body = {"source": cfg.data.source, "args": cfg.data.args, "files": files,
            "normalization": stats.read_text() if stats.is_file() else None}  # fmt: skip
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "source": cfg.data.source, "files": files,
            "covers": "data.source, data.args, each named file's path/size/mtime, normalization.json"}  # fmt: skip


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def card(cfg: Config, run_dir: Path, dataset: Dataset, inputs: list[str], outputs: list[str],
         normalization: dict[str, Any] | None, artefacts: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The card of one export (``artefacts``: per artefact its file, format, verification or failure)."""
    files = RunDir(run_dir)
    summary, identity = _json(files.summary), _json(files.identity)
    return {
        "card_format": CARD_FORMAT,
        "run_dir": str(Path(run_dir).resolve()),
        "inputs": [_spec_dict(s, variables(dataset, "input")) for s in inputs],
        "outputs": [
            _spec_dict(s, variables(dataset, "target") if len(outputs) == 1 else None) for s in outputs
        ],
        "normalization": normalization,
        "artefacts": artefacts,
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),  # of the config above (with any --set); training's is in run.json
        "training_config_hash": identity.get("config_hash"),
        "data_fingerprint": data_fingerprint(cfg, Path(run_dir)),
        "metrics": summary.get("final"),
        "run_id": identity.get("run_id"),
        "git": identity.get("git"),
        "versions": {
            "caldera": _version("caldera"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
    }
