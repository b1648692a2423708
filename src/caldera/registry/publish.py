"""``caldera publish RUN_DIR``: a finished run as a new immutable version in the registry.

The run is exported (``caldera export``: safetensors at least, verified against the eager model) into a hidden
staging directory inside the registry, beside the files ``caldera predict``/``serve`` rebuild the model from
(config.resolved.json, model.pt, normalization.json), its summary and identity, a provenance record (who, when,
where, versions) and a model card (README.md). Every file is hashed into the MANIFEST, written last; the version
then takes the next number of its name (caldera.registry.Registry.commit) and appears whole.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from caldera.errors import ConfigError
from caldera.export import export
from caldera.export.card import CARD
from caldera.io import atomic_write, atomic_write_text
from caldera.parallel.tensor import read_sharded_weights
from caldera.registry import PROVENANCE, Registry, Version, check_name, check_tag, write_manifest
from caldera.train.rundir import RunDir

# What a run directory holds that predict, serve and Surrogate.from_run read (config + weights + the statistics the
# data pipeline normalises with), and the run's own record of itself.
RUN_FILES = (
    "config.resolved.json",
    "model.pt",
    "normalization.json",
    "summary.json",
    "run.json",
    "metrics.jsonl",
)


def publish(run_dir: str | Path, name: str | None = None, tags: list[str] | tuple[str, ...] = (),
            registry: str | Path | None = None, formats: list[str] | tuple[str, ...] = ("safetensors",),
            trust_code: bool = False, samples: int = 32, threads: int | None = None,
            echo: bool = True) -> tuple[Version, str]:  # fmt: skip
    """Publish a finished run as the next version of ``name`` (default: the run directory's name); return the version
    and its content hash. Bad input is a ConfigError before anything is visible in the registry."""
    run = RunDir(run_dir)
    missing = run.missing()
    if missing:
        raise ConfigError(f"{run_dir} has no {' or '.join(missing)}: give the run directory of a finished "
                          "`caldera train` run")  # fmt: skip
    for tag in tags:
        check_tag(tag)
    formats = list(dict.fromkeys(["safetensors", *formats]))
    name = check_name(name or _run_name(run))
    reg = Registry.find(registry, create=True)
    reg.clean_stale()
    staged = reg.staging(name)
    try:
        result = export(run.path, formats, out=staged, samples=samples, trust_code=trust_code, echo=echo,
                        threads=threads)  # fmt: skip
        if result.code != 0:
            why = (
                "; ".join(f"{k}: {v}" for k, v in result.failed.items()) or "an artefact is beyond tolerance"
            )
            raise ConfigError(
                f"not published: the export did not pass ({why}); fix it or publish fewer --format"
            )
        for file in RUN_FILES:
            if (run.path / file).is_file():
                shutil.copyfile(run.path / file, staged / file)
        # Weights written shard-wise (tensor parallel): the version holds them joined, as model.pt.
        if not (staged / "model.pt").is_file():
            state = read_sharded_weights(run.weight_shards)
            atomic_write(staged / "model.pt", lambda f: torch.save(state, f))
        card = json.loads((staged / CARD).read_text())
        provenance = _provenance(run.path, name, formats)
        atomic_write_text(staged / PROVENANCE, json.dumps(provenance, indent=2))
        atomic_write_text(staged / "README.md", model_card(name, card, provenance))
        digest = write_manifest(staged)
        version = reg.commit(name, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    for tag in tags:
        reg.tag(name, tag, version.number)
    return version, digest


def _run_name(run: RunDir) -> str:
    """The run directory's name (runs/heat-surrogate: heat-surrogate, the [run] name unless [run] dir was set)."""
    return run.path.resolve().name


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _provenance(run_dir: Path, name: str, formats: list[str]) -> dict[str, Any]:
    """Who published what, when, where, with which software."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return {
        "name": name,
        "published_by": user,
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "source_run_dir": str(run_dir.resolve()),
        "formats": formats,
        "command": " ".join(sys.argv),
        "versions": {
            "caldera": _version("caldera"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
    }


def model_card(name: str, card: dict[str, Any], provenance: dict[str, Any]) -> str:
    """README.md of a version: what goes in and out, how well it did, what it came from, how to run it."""
    cfg = card.get("config") or {}
    model, data, optim = cfg.get("model", {}), cfg.get("data", {}), cfg.get("optim", {})
    fp = card.get("data_fingerprint") or {}
    lines = [f"# {name}", "",
             f"A `{model.get('name')}` model trained by Caldera on the `{data.get('source')}` data source, "
             f"published by {provenance['published_by']} on {provenance['host']} at {provenance['published_at']}.",
             "", "## Inputs and outputs", "", "| | name | dtype | shape (batch = -1) | variables |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for kind in ("inputs", "outputs"):
        for spec in card.get(kind, []):
            variables = ", ".join(
                f"{v['variable']} [{v.get('units') or '-'}]" for v in spec.get("variables") or []
            )
            lines.append(
                f"| {kind[:-1]} | {spec['name']} | {spec['dtype']} | {spec['shape']} | {variables or '-'} |"
            )
    lines += ["", "## Metrics (end of training)", ""]
    lines += [
        f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}"
        for k, v in (card.get("metrics") or {}).items()
    ]
    lines += ["", "## Training", "",
              f"- model: `{model.get('name')}` {json.dumps(model.get('args', {}))}",
              f"- data: `{data.get('source')}` {json.dumps(data.get('args', {}))}",
              f"- optimiser: {optim.get('name')}, lr {optim.get('lr')}, {optim.get('epochs')} epochs",
              f"- config hash: {card.get('config_hash')}; run id: {card.get('run_id')}; git: {card.get('git')}",
              f"- data fingerprint: {fp.get('sha256')} ({fp.get('covers')})",
              "", "## Files", "", "| file | format | verified (max abs error) |", "| --- | --- | --- |"]  # fmt: skip
    for entry in (card.get("artefacts") or {}).values():
        check = entry.get("verification") or {}
        lines.append(
            f"| {entry['file']} | {entry['format']} | {check.get('ok')} ({check.get('max_abs_error')}) |"
        )
    lines += ["", "## Use", "", "```bash", f"caldera predict {name}@latest --out pred.npy",
              f"caldera serve {name}@latest", "```", "", "```python",
              "from caldera.coupling import Surrogate", "", f'model = Surrogate.from_run("{name}@latest")', "```",
              "", "Versions: " + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items()), ""]  # fmt: skip
    return "\n".join(lines)
