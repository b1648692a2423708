"""The search's record in the run directory: trials.csv, best.json, tune.png (and pareto.png), the summary."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from caldera.config import RangeSpec
from caldera.io import atomic_write_text
from caldera.train.output import pyplot, save_figure
from caldera.tune.space import literal


class TuneFailed(RuntimeError):
    """Every trial of the search failed."""


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write trials.csv (atomically: any rank may rewrite it after its trial)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


def best(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The best completed row of a single-objective study (None if none completed)."""
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        return None
    pick = min if direction == "minimize" else max
    return pick(done, key=lambda r: r["value"])


def pareto(rows: list[dict[str, Any]], spec) -> list[dict[str, Any]]:
    """The completed rows no other completed row beats in every metric (the Pareto front)."""
    signs = [1 if d == "minimize" else -1 for d in spec.directions]
    done = [r for r in rows if r["state"] == "complete"]
    keyed = [[s * r[m] for s, m in zip(signs, spec.metrics, strict=True)] for r in done]

    def dominated(a: list[float]) -> bool:
        return any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for b in keyed)

    return [r for r, k in zip(done, keyed, strict=True) if not dominated(k)]


def finish(out: Path, rows: list[dict[str, Any]], spec, config, requeued: int = 0) -> dict[str, Any]:
    """Write best.json and the plots and print the outcome; return the summary (or {"error": why})."""
    counted = [r for r in rows if r["state"] != "retried"]
    failed = sum(r["state"] == "failed" for r in counted)
    pruned = sum(r["state"] == "pruned" for r in counted)
    head = f"{len(counted)} trials ({failed} failed, {pruned} pruned)"
    if not any(r["state"] == "complete" for r in counted):
        first = next((r["error"] for r in counted if r["error"]), "pruned")
        return {"error": f"all {len(counted)} trials failed; the first: {first} (logs: {out.parent}/trials/)"}
    if len(spec.metrics) > 1:
        return _finish_pareto(out, rows, counted, spec, config, head)
    top = best(counted, spec.direction)
    assert top is not None
    params = {k: top[k] for k in spec.space}
    summary = {"trial": top["trial"], spec.metric: top["value"], "params": params, "trials": len(counted),
               "failed": failed, "pruned": pruned, "command": _command(config, params)}  # fmt: skip
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2))
    _plot(out / "tune.png", counted, spec)
    print(f"best of {head}: trial {top['trial']}, {spec.metric} {top['value']:.4g}")
    print("  " + _params_text(params))
    print(f"  train it: {summary['command']}")
    print(f"  record: {out}/trials.csv, best.json, tune.png")
    return summary


def _finish_pareto(out, rows, counted, spec, config, head) -> dict[str, Any]:
    front = sorted(pareto(counted, spec), key=lambda r: r[spec.metrics[0]])
    entries = [{"trial": r["trial"], "scores": {m: r[m] for m in spec.metrics}, "params": {k: r[k] for k in spec.space},
                "command": _command(config, {k: r[k] for k in spec.space})} for r in front]  # fmt: skip
    summary = {
        "pareto": entries,
        "trials": len(counted),
        "failed": sum(r["state"] == "failed" for r in counted),
        "pruned": 0,
    }
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2))
    _plot_pareto(out / "pareto.png", counted, front, spec)
    print(f"Pareto front of {head}: {len(front)} trials")
    for e in entries:
        scores = ", ".join(f"{m} {v:.4g}" for m, v in e["scores"].items())
        print(f"  trial {e['trial']}: {scores}; {_params_text(e['params'])}")
    print(f"  record: {out}/trials.csv, best.json (the front, with train commands), pareto.png")
    return summary


def _command(config, params: dict[str, Any]) -> str:
    sets = " ".join(f"--set {k}={literal(v)}" for k, v in params.items())
    return f"caldera train {config} {sets}".strip()


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in params.items())


def _plot(path: Path, rows, spec) -> None:
    plt = pyplot()
    numeric = [k for k, d in spec.space.items() if isinstance(d, RangeSpec)][:3]
    fig, axes = plt.subplots(1, 1 + len(numeric), figsize=(4.2 * (1 + len(numeric)), 3.4), squeeze=False)
    done = [r for r in rows if r["state"] == "complete"]
    ax = axes[0][0]
    ax.plot([r["trial"] for r in done], [r["value"] for r in done], "o", label="trial")
    pick = min if spec.direction == "minimize" else max
    running, top = [], None
    for r in sorted(done, key=lambda r: r["trial"]):
        top = r["value"] if top is None else pick(top, r["value"])
        running.append(top)
    ax.step(sorted(r["trial"] for r in done), running, where="post", label="best so far")
    ax.set(xlabel="trial", ylabel=spec.metric, title=f"{len(done)} of {len(rows)} trials completed")
    ax.legend()
    for ax, key in zip(axes[0][1:], numeric, strict=False):
        ax.plot([r[key] for r in done], [r["value"] for r in done], "o")
        ax.set(xlabel=key, ylabel=spec.metric, xscale="log" if spec.space[key].log else "linear")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_pareto(path: Path, rows, front, spec) -> None:
    plt = pyplot()
    x, y = spec.metrics[:2]
    done = [r for r in rows if r["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot([r[x] for r in done], [r[y] for r in done], "o", color="0.6", label="trial")
    ax.plot([r[x] for r in front], [r[y] for r in front], "o-", color="C3", label="Pareto front")
    for r in front:
        ax.annotate(str(r["trial"]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=f"{x} ({spec.directions[0]})", ylabel=f"{y} ({spec.directions[1]})",
           title=f"{len(front)} of {len(done)} completed trials on the front")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
