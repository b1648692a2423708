"""Search a long record for chirps with a CNN ensemble (through `caldera predict`) and with a matched-filter template
bank, and compare: hours of data per second of wall time, detections by SNR at one false alarm per day, the
efficiency curve.

    python examples/chirp_eval.py --write-record month.npy --days 30          # the record, its catalogue
    caldera train examples/chirp.toml ...                                      # the four members (see chirp.toml)
    mpiexec -n 2 caldera predict runs/chirp-w8-s0 runs/chirp-w8-s1 runs/chirp-w12-s0 runs/chirp-w12-s1 \\
        --set data.args.record=month.npy --split all --out month.scores.npy   # the ensemble's scan
    python examples/chirp_eval.py --record month.npy --scores month.scores.npy --timing month.scores.json \\
        --out results/chirp                                                    # this script: tables, figure
Without --scores it runs the scan itself (in this process) with the run directories it is given. Several --scores
are scored each alone, then as mean ± sd; with --ensemble K they are single networks' scans (`caldera predict RUN`),
and each successive K of them is also averaged into an ensemble's scan and scored (docs/chirp.md, the seeds):
    python examples/chirp_eval.py --record month.npy --ensemble 4 --scores w8-s0.npy w8-s1.npy w12-s0.npy \\
        w12-s1.npy w8-s2.npy w8-s3.npy w12-s2.npy w12-s3.npy --out results/chirp-seeds
Smoke run (seconds, after chirp.toml's smoke run): python examples/chirp_eval.py runs/chirp --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from caldera.io import atomic_write_text
from caldera.predict import predict
from caldera.sims import chirp
from caldera.train.output import pyplot, save_figure
from caldera.train.run import spread

HOP = 16384  # record samples per scanned chunk (64 s), the data source's default
FAR_PER_DAY = 1.0  # both searches are compared at the threshold that gives this many false alarms per day
# The matched filter's bank: evenly spaced in chirp duration over the injected masses (match >= 0.96).
TEMPLATES = 32
SMOKE = {"hours": 0.2, "every": 30.0, "hop": 4096, "templates": 8}


def search_cnn(runs: list[str], record: Path, scores: Path, hop: int) -> dict:
    """The ensemble's scan of ``record`` through caldera.predict (this process, one rank): its timing report."""
    predict(runs, "all", [f"data.args.record={record}", f"data.args.hop={hop}"], out=scores, score=False,
            progress=False)  # fmt: skip
    return json.loads(scores.with_suffix(".json").read_text())


def search_matched_filter(record_path: Path, templates: int, cache: Path) -> dict:
    """The bank's SNR series over the record (one process, one core) and its speed; the series is kept in
    ``cache`` (a month takes tens of minutes) and read back when it was made from this same record."""
    meta = chirp.meta_path(record_path).read_text()
    if cache.is_file():
        with np.load(cache) as f:
            if "meta" in f.files and str(f["meta"]) == meta:
                return {"t": f["t"], "snr": f["snr"], "hours_per_s": float(f["hours_per_s"]),
                        "templates": templates}  # fmt: skip
    record = chirp.open_record(record_path)
    started, cpu = time.perf_counter(), time.process_time()
    t, snr = chirp.matched_filter(record, chirp.bank(templates))
    rate = len(record) / chirp.FS / 3600 / (time.perf_counter() - started)
    # CPU seconds too: on a shared machine the wall clock measures the other jobs as much as this one
    print(
        f"matched filter: {time.process_time() - cpu:.1f} s of CPU, {time.perf_counter() - started:.1f} s wall"
    )
    tmp = cache.with_name(f".{cache.name}.partial.npz")
    np.savez(tmp, t=t, snr=snr, hours_per_s=rate, meta=meta)
    os.replace(tmp, cache)
    return {"t": t, "snr": snr, "hours_per_s": rate, "templates": templates}


def hours_per_s(report: dict, hop: int) -> float:
    """Hours of data per second from `caldera predict`'s report (chunks of ``hop`` samples per second)."""
    return report["samples_per_s"] * hop / chirp.FS / 3600.0


def summary(scored: list[dict]) -> dict:
    """Several scans of one record, each scored alone -> what they found (in all and per SNR bin), its efficiency
    and the threshold as mean ± sd over the scans, with every scan's value."""
    first = scored[0]
    bins = [{"snr": rows[0]["snr"], "injected": rows[0]["injected"], "found": spread([r["found"] for r in rows]),
             "efficiency": spread([r["efficiency"] for r in rows])}
            for rows in zip(*(r["by_snr"] for r in scored))]  # fmt: skip
    return {"scans": len(scored), "injected": first["injected"], "found": spread([r["found"] for r in scored]),
            "efficiency": spread([r["found"] / r["injected"] for r in scored]),
            "threshold": spread([r["threshold"] for r in scored]), "by_snr": bins,
            "snr50": spread([r["snr50"] for r in scored])}  # fmt: skip


def snr50(by_snr: list[dict]) -> float:
    """The SNR at which half the injections are found: linear between the bins' centres where the efficiency
    first reaches 50 % (NaN if it never does)."""
    rows = [r for r in by_snr if r["injected"]]
    for a, b in zip(rows, rows[1:]):
        if b["efficiency"] >= 0.5 > a["efficiency"]:
            x0, x1 = np.mean(a["snr"]), np.mean(b["snr"])
            return float(x0 + (x1 - x0) * (0.5 - a["efficiency"]) / (b["efficiency"] - a["efficiency"]))
    return float("nan")


def label(path: str | Path) -> str:
    """A scan's short name: ``month-w8-s0.scores.npy`` -> ``month-w8-s0``."""
    return Path(path).name.removesuffix(".npy").removesuffix(".scores")


def ensemble_scan(paths: list[Path]) -> np.ndarray:
    """The mean of single networks' scans: what `caldera predict` writes for the ensemble of their runs (the mean
    of the members' logits), to float32 rounding."""
    total = None
    for path in paths:  # one at a time: a month's scan is 332 MB
        pred = np.load(path, mmap_mode="r")
        if total is not None and pred.shape != total.shape:
            raise SystemExit(f"{path}: scan of shape {pred.shape}, not {total.shape} like {paths[0]}: "
                             "give scans of the same record with the same hop")  # fmt: skip
        total = pred.astype(np.float64) if total is None else total + pred
    return (total / len(paths)).astype(np.float32)


def value(x) -> float:
    """A scan's number, or the mean of a summary's."""
    return x["mean"] if isinstance(x, dict) else x


def plot_efficiency(results: dict, path: Path) -> Path:
    """Fraction of injections found against their SNR, both searches at the same false-alarm rate (several scans:
    their mean, the bars their sd)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = [("matched_filter", f"matched filter, {results['matched_filter']['templates']} templates", "tab:orange",
              ""), ("cnn_ensemble", "CNN ensemble, 4 nets", "tab:blue", "ensembles"),
             ("cnn_single", "one CNN", "tab:gray", "nets")]  # fmt: skip
    for name, label, color, noun in lines:
        if name not in results:
            continue
        rows = [r for r in results[name]["by_snr"] if r["injected"]]
        x = [np.mean(r["snr"]) for r in rows]
        n = results[name].get("scans", 1)
        sd = [r["efficiency"]["sd"] for r in rows] if n > 1 else None
        ax.errorbar(x, [value(r["efficiency"]) for r in rows], sd, fmt="o-", color=color, capsize=3,
                    label=label + (f" (mean ± sd of {n} {noun})" if n > 1 else ""))  # fmt: skip
    ax.set(xlabel="injected optimal SNR", ylabel="fraction found", ylim=(-0.02, 1.02),
           title=f"chirps found at {FAR_PER_DAY:g} false alarm per day ({results['days']:.3g} days of data)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def count(found, fraction) -> str:
    """A table cell: a scan's count (fraction), or a summary's mean ± sd (mean fraction ± sd)."""
    if isinstance(found, dict):
        return f"{found['mean']:.0f} ± {found['sd']:.0f} ({fraction['mean']:.1%} ± {fraction['sd']:.1%})"
    return f"{found} ({fraction:.1%})"


def table(results: dict) -> str:
    """Markdown: detections by SNR bin for both searches (and single networks, where scored), then in all."""
    searches = [results["matched_filter"], results["cnn_ensemble"]] + (
        [results["cnn_single"]] if "cnn_single" in results else []
    )
    names = ["matched filter", "CNN ensemble", "one CNN"]
    heads = [
        n + (f", mean ± sd of {s['scans']}" if s.get("scans", 1) > 1 else "") for n, s in zip(names, searches)
    ]
    lines = [
        "| SNR | injected | " + " | ".join(f"{h} found" for h in heads) + " |",
        "|---" * (2 + len(searches)) + "|",
    ]
    for rows in zip(*(s["by_snr"] for s in searches)):
        if rows[0]["injected"]:  # bins without injections (a short record) are left out
            lines.append(f"| {rows[0]['snr'][0]:g}-{rows[0]['snr'][1]:g} | {rows[0]['injected']} | "
                         + " | ".join(count(r["found"], r["efficiency"]) for r in rows) + " |")  # fmt: skip
    total = [
        count(s["found"], s["efficiency"] if "scans" in s else s["found"] / s["injected"]) for s in searches
    ]
    lines.append(f"| all | {results['injections']} | " + " | ".join(total) + " |")
    return "\n".join(lines)


def scans_table(results: dict) -> str:
    """Markdown: every scan scored alone at the same false-alarm rate (and every ensemble made of them)."""
    lines = ["| scan | threshold | found | SNR 6-8 / 8-10 found | 50 % found at SNR |", "|---" * 5 + "|"]
    for r in results.get("cnn_scans", []) + results.get("cnn_ensembles", []):
        name = r.get("name") or "ensemble: mean of " + ", ".join(map(label, r["members"]))
        mid = [b["found"] for b in r["by_snr"] if b["snr"][0] in (6.0, 8.0)]
        lines.append(f"| {name} | {r['threshold']:.2f} | {r['found']} ({r['found'] / r['injected']:.1%}) | "
                     + " / ".join(map(str, mid)) + f" | {r['snr50']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    """Write a record, or evaluate both searches on one."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run directories of the ensemble (when --scores is not given)")
    p.add_argument("--record", type=Path, help="the record (.npy written by --write-record)")
    p.add_argument("--write-record", type=Path, metavar="PATH", help="write a record here and stop")
    p.add_argument("--days", type=float, default=30.0, help="length of the record written")
    p.add_argument("--every", type=float, default=200.0, help="seconds between injections (jittered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scores", type=Path, nargs="+", help="`caldera predict`'s scans of the record (.npy): "
                   "one, or several (each scored alone, then their mean ± sd)")  # fmt: skip
    p.add_argument("--ensemble", type=int, default=0, metavar="K", help="the --scores are single networks' scans: "
                   "also score the mean of each successive K of them, an ensemble of K")  # fmt: skip
    p.add_argument(
        "--timing", type=Path, nargs="*", default=[], help="`caldera predict` reports (.json) to tabulate"
    )
    p.add_argument("--hop", type=int, default=HOP, help="the chunk hop the scan used (data.args.hop)")
    p.add_argument("--templates", type=int, default=TEMPLATES)
    p.add_argument("--out", type=Path, help="directory for evaluation.json and chirp_efficiency.png")
    p.add_argument(
        "--smoke", action="store_true", help="seconds: a 12-minute record (the test suite runs this)"
    )
    args = p.parse_args()
    if args.write_record:
        started = time.perf_counter()
        inj = chirp.write_record(args.write_record, args.days * 86400, args.every, seed=args.seed)
        print(f"wrote {args.write_record}: {args.days:g} days, {len(inj)} injections, "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        return
    hop, templates = args.hop, args.templates
    if args.smoke:
        run = Path(args.runs[0] if args.runs else "runs/chirp")
        args.record, args.out = run / "smoke_record.npy", args.out or run
        hop, templates = SMOKE["hop"], SMOKE["templates"]
        chirp.write_record(args.record, SMOKE["hours"] * 3600, SMOKE["every"], snr=(8.0, 24.0), seed=1)
        args.runs = [str(run), str(run)]  # a two-member ensemble (the same run twice): the ensemble path runs
    if args.record is None:
        p.error("give --record (and --scores or the ensemble's run directories), or --write-record")
    out = args.out or args.record.parent
    out.mkdir(parents=True, exist_ok=True)
    record = chirp.open_record(args.record)
    inj = chirp.read_catalogue(args.record)
    seconds = len(record) / chirp.FS
    mf = search_matched_filter(args.record, templates, out / f"{args.record.stem}.mf{templates}.npz")
    mf.update(chirp.evaluate(*chirp.triggers(mf.pop("t"), mf.pop("snr"), 5.0), inj, seconds, FAR_PER_DAY))
    mf["snr50"] = snr50(mf["by_snr"])
    print(f"{seconds / 86400:.3g} days, {len(inj)} injections; thresholds at {FAR_PER_DAY:g} false alarm/day")
    print(f"matched filter ({templates} templates, 1 process): {mf['hours_per_s']:.3g} h of data/s, threshold SNR "
          f"{mf['threshold']:.2f}, {mf['found']}/{len(inj)} found, {mf['false_alarms_per_day']:.2f} false alarms/day, "
          f"50 % found at SNR {mf['snr50']:.2f}")  # fmt: skip
    if args.scores is None and not args.runs:
        return  # the matched filter alone (its series is kept for the comparison)
    if args.ensemble < 0 or (args.ensemble and len(args.scores or ()) % args.ensemble):
        p.error(f"--ensemble {args.ensemble}: give a positive multiple of it as --scores (got "
                f"{len(args.scores or ())})")  # fmt: skip
    reports = [json.loads(t.read_text()) for t in args.timing]
    if args.scores is None:
        args.scores = [out / f"{args.record.stem}.scores.npy"]
        reports.append(search_cnn(args.runs, args.record, args.scores[0], hop))

    def scored(pred: np.ndarray) -> dict:
        t, stat = chirp.scan_series(pred, len(record), hop)
        result = chirp.evaluate(*chirp.triggers(t, stat, 0.0), inj, seconds, FAR_PER_DAY)
        result.pop("found_mask")
        result["snr50"] = snr50(result["by_snr"])
        return result

    scans = [{"name": label(s), **scored(np.load(s, mmap_mode="r"))} for s in args.scores]
    results = {"record": str(args.record), "days": seconds / 86400, "injections": len(inj),
               "far_per_day": FAR_PER_DAY, "matched_filter": mf}  # fmt: skip
    mf.pop("found_mask")
    if len(scans) > 1 or args.ensemble:
        results["cnn_scans"] = scans
    if args.ensemble:
        groups = [args.scores[i : i + args.ensemble] for i in range(0, len(args.scores), args.ensemble)]
        ensembles = [{"members": [str(g) for g in group], **scored(ensemble_scan(group))} for group in groups]
        results["cnn_ensembles"] = ensembles
        results["cnn_single"] = summary(scans)
        nn = summary(ensembles) if len(ensembles) > 1 else ensembles[0]
    else:
        nn = summary(scans) if len(scans) > 1 else scans[0]
    nn["hours_per_s"] = max(hours_per_s(r, hop) for r in reports) if reports else float("nan")
    nn["scans_timed"] = [{"ranks": r["ranks"], "models": r.get("models", 1), "hours_per_s": hours_per_s(r, hop)}
                         for r in reports]  # fmt: skip
    results["cnn_ensemble"] = nn
    atomic_write_text(out / "evaluation.json", json.dumps(results, indent=2))
    plot_efficiency(results, out / "chirp_efficiency.png")
    for s in nn["scans_timed"]:
        print(
            f"CNN ensemble ({s['models']} models, {s['ranks']} rank(s)): {s['hours_per_s']:.3g} h of data/s"
        )
    for r in scans + results.get("cnn_ensembles", []):
        print(f"CNN {r.get('name') or 'ensemble of ' + str(len(r['members']))}: threshold {r['threshold']:.2f}, "
              f"{r['found']}/{len(inj)} found, {r['false_alarms_per_day']:.2f} false alarms/day, 50 % found at SNR "
              f"{r['snr50']:.2f}")  # fmt: skip
    for key, what in (("cnn_single", "single networks"), ("cnn_ensemble", "ensembles")):
        if results.get(key, {}).get("scans", 1) > 1:
            f, eff, half = (results[key][k] for k in ("found", "efficiency", "snr50"))
            print(f"{what} ({len(f['values'])}): {f['mean']:.1f} ± {f['sd']:.1f} found ({eff['mean']:.2%} ± "
                  f"{eff['sd']:.2%}; each: " + ", ".join(map(str, f["values"])) + f"), 50 % found at SNR "
                  f"{half['mean']:.2f} ± {half['sd']:.2f} (each: " + ", ".join(f"{v:.2f}" for v in half["values"])
                  + ")")  # fmt: skip
    print(table(results))
    if "cnn_scans" in results:
        print(scans_table(results))
    print(f"wrote {out / 'evaluation.json'}, {out / 'chirp_efficiency.png'}")


if __name__ == "__main__":
    main()
