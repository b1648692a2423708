"""``caldera export``: a finished run's model, in physical units, to files that run without Python, each verified.

The run's data pipeline is rebuilt from its resolved config (as ``caldera predict`` does), its model loaded from
model.pt, wrapped with the pipeline's normalisation (caldera.export.physical) and written in every format asked
for (caldera.export.formats). Each artefact is loaded back and run on held-out samples (caldera.export.verify);
the card (caldera.export.card) records what was written, how well it agreed, and why a format could not be made.
A format that cannot be exported is one line naming the operation that blocks it; the others still export.
Exit codes (``Result.code``): 0 every artefact written and within tolerance; 1 an artefact disagrees with the eager
model beyond tolerance; 2 a format could not be exported (the request cannot be met).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from caldera.errors import ConfigError
from caldera.export import card as cards
from caldera.export.formats import FORMATS, AOTInductor, Job, artefacts, blocker
from caldera.export.physical import PhysicalModel, normalization, physical_model
from caldera.export.verify import Check, check, held_out, reference
from caldera.io import atomic_write_text, sha256_file
from caldera.predict import load_run_config
from caldera.train.run import build_data, build_model, load_run_model
from caldera.train.rundir import RunDir

DEFAULT_RTOL, DEFAULT_ATOL = 1e-4, 1e-5


@dataclass
class Result:
    """What an export did: the card's path, each artefact's check, the formats that failed and why."""

    out: Path
    checks: dict[str, Check] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> int:
        """0 all good; 1 an artefact beyond tolerance; 2 a format could not be exported."""
        if any(not c.ok for c in self.checks.values()):
            return 1
        return 2 if self.failed else 0


def export(run_dir: str | Path, formats: list[str] | tuple[str, ...] = FORMATS, out: str | Path | None = None,
           device: str = "cpu", samples: int = 32, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
           overrides: list[str] | tuple[str, ...] = (), trust_code: bool = False,
           echo: bool = True, threads: int | None = None) -> Result:  # fmt: skip
    """Export a finished run's model in ``formats`` to ``out`` (default RUN_DIR/export), verify each, write the
    card. ``threads`` compiles the CPU AOTInductor package for that many threads per call (1: an MPI rank per core;
    fastest for small models). Bad input (no such run, an unknown format, untrusted code) is a ConfigError before
    anything is written."""
    if threads is not None and threads < 1:
        raise ConfigError(
            f"--threads {threads}: give 1 or more threads per call (or leave it out: the caller's pool)"
        )
    planned = artefacts(list(formats), _device(device), threads)
    if samples < 1:
        raise ConfigError(f"--samples {samples}: verify on at least 1 sample")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides, trust_code)
    out = Path(out) if out is not None else run_dir / "export"
    train, val = build_data(cfg, frozen_stats=True)
    for part in (train, val):
        for ds in getattr(part, "datasets", [part]) if part is not None else ():
            if getattr(ds, "transform", None) is not None:
                ds.transform = None  # augmentation is for training: export sees the samples as stored
    held = held_out(train, val, max(2, samples))
    dataset = val if held.split == "val" else train
    model = load_run_model(RunDir(run_dir), cfg).eval()
    module = physical_model(model, dataset, held.normalized[:2])
    example = _batch_of_two(held.physical)
    expected = reference(model, dataset, held.normalized)
    with torch.no_grad():
        example_out = module(example)
    inputs, outputs = cards.io_specs(module, example, example_out)
    metadata = {"caldera.inputs": ";".join(inputs), "caldera.outputs": ";".join(outputs), "caldera.device": "cpu",
                "caldera.format": "1", **cards.provenance(cfg)}  # fmt: skip
    job = Job(module, example, metadata, blank=lambda: _blank(cfg, module))
    result = Result(out)
    listed: dict[str, dict[str, Any]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for fmt in planned:
        path = out / fmt.file_name
        entry: dict[str, Any] = {"format": fmt.name, "file": fmt.file_name, "device": fmt.device}
        if isinstance(fmt, AOTInductor):  # compiled for a thread count (--threads) or for the caller's pool
            entry["threads_per_call"] = fmt.threads
        listed[fmt.key] = entry
        try:
            with _quiet():
                fmt.export(job, path)
        except ConfigError as exc:  # a missing optional package: the install line
            result.failed[fmt.key] = entry["error"] = str(exc)
            _say(echo, f"caldera export: {fmt.key}: {exc}", err=True)
            continue
        except Exception as exc:  # torch's exporters raise anything; the cause is named, the others go on
            why = blocker(exc, _differentiates(module, example))
            result.failed[fmt.key] = entry["error"] = f"cannot export: {why}"
            _say(echo, f"caldera export: {fmt.key}: cannot export: {why}", err=True)
            continue
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        try:
            with _quiet():
                verdict = check(fmt.load(path, job), held, expected, rtol, atol)
        except Exception as exc:  # an artefact that will not load or run is a failed verification
            verdict = Check(False, float("inf"), float("inf"), rtol, atol, len(held.physical), (), held.split)
            entry["error"] = f"verification could not run it: {' '.join(str(exc).split())[:300]}"
        result.checks[fmt.key] = verdict
        entry["verification"] = verdict.as_dict()
        state = "ok" if verdict.ok else f"BEYOND TOLERANCE (rtol {rtol:g}, atol {atol:g})"
        _say(echo, f"  {fmt.key:<12} {fmt.file_name:<22} max abs err {verdict.max_abs_error:.3g}  "
                   f"max rel err {verdict.max_rel_error:.3g}  {state}")  # fmt: skip
        if not verdict.ok:
            _say(echo, f"caldera export: {fmt.key}: {entry.get('error') or 'verification failed'}: max abs error "
                       f"{verdict.max_abs_error:.3g} on {held.split} samples in physical units", err=True)  # fmt: skip
    body = cards.card(cfg, run_dir, dataset, inputs, outputs, normalization(dataset), listed)
    atomic_write_text(out / cards.CARD, json.dumps(body, indent=2, default=str))
    made = ", ".join(result.checks) or "none"
    _say(echo, f"caldera export: wrote {out / cards.CARD}; verified: {made}"
               + (f"; not exported: {', '.join(result.failed)}" if result.failed else ""))  # fmt: skip
    for ds in (train, val):
        if hasattr(ds, "close"):
            ds.close()
    return result


def _device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda") and torch.cuda.is_available():
        return device
    raise ConfigError(f"--device {device}: use cpu, or cuda on a machine with a GPU (torch sees none here)")


def _batch_of_two(x: torch.Tensor) -> torch.Tensor:
    """An example batch of 2, so torch.export does not specialise the batch axis on 1."""
    return x[:2] if len(x) >= 2 else torch.cat([x, x])


def _blank(cfg: Any, like: PhysicalModel) -> PhysicalModel:
    """A new physical-units module of the same structure (random weights; safetensors fills every tensor)."""
    blank = build_model(cfg, weights=False)
    pairs = {}
    for kind in ("input", "target"):
        mean = getattr(like, f"{kind}_mean", None)
        pairs[kind] = None if mean is None else (torch.zeros_like(mean), torch.ones_like(mean))
    return PhysicalModel(blank, pairs["input"], pairs["target"]).eval()


def _differentiates(module: torch.nn.Module, example: torch.Tensor) -> bool:
    """Whether the module builds an autograd graph even under no_grad (it differentiates inside forward)."""
    recorded = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        recorded.append(1)
        return t

    try:
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(example)
    except Exception:  # the question is only whether autograd ran before any failure
        pass
    return bool(recorded)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporters' own output out of the one line per format: tracer warnings, graph dumps that torch prints
    or logs on a failed export, the C++ compiler's. They go at the file-descriptor level (torch's log handlers and
    the compiler write to fd 2 directly); what matters reaches us as the exception."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for stream in streams:
        if stream is not None:
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):  # fmt: skip
                    warnings.simplefilter("ignore")
                    yield
            finally:
                for stream in streams:
                    if stream is not None:
                        stream.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _say(echo: bool, line: str, err: bool = False) -> None:
    if echo:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)
