"""caldera serve with dynamic batching vs. one forward pass per request (what a hand-written endpoint does).

    python benchmarks/bench_serve.py [--clients 16] [--requests 40] [--model unet|mlp]

Starts `caldera serve` twice on the same run directory (an untrained heat-surrogate U-Net, or an MLP), once with
--max-batch 1 (the peer: every request its own forward pass) and once batching, and lets N concurrent clients send
single-sample requests over kept-alive connections, all opened at once. Prints completed requests/s, latency
percentiles (p50, p95, p99), failed requests (a reset connection, say) and the ratio. Same machine, same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from caldera.config import Config
from caldera.serve import predict
from caldera.train.run import build_model

MODELS = {
    "unet": (
        {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1, "channels": 16}},
        (2, 32, 32),
    ),
    "mlp": ({"name": "mlp", "args": {"sizes": [1024, 2048, 2048, 10]}}, (1024,)),
}

# --smoke: two clients, three requests each, against both servers.
SMOKE = {"clients": 2, "requests": 3}


def run_dir(root: Path, model: str) -> tuple[Path, tuple[int, ...]]:
    spec, shape = MODELS[model]
    cfg = Config.model_validate({"model": spec, "data": {"source": "heat"}})
    path = root / model
    path.mkdir()
    (path / "config.resolved.json").write_text(json.dumps(cfg.model_dump(), default=str))
    torch.save(build_model(cfg).state_dict(), path / "model.pt")
    return path, shape


def measure(
    path: Path, shape: tuple[int, ...], clients: int, requests: int, extra: list[str]
) -> dict[str, float]:
    server = subprocess.Popen([sys.executable, "-m", "caldera.cli", "serve", str(path), "--port", "0", *extra],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
        predict(url, x)  # warm-up
        latencies: list[float] = []
        failed: list[str] = []
        go = threading.Barrier(clients + 1)

        def client() -> None:
            go.wait()
            for _ in range(requests):
                t0 = time.perf_counter()
                try:
                    predict(url, x)
                except Exception as exc:  # counted, not fatal: the other requests of this client still run
                    failed.append(type(exc).__name__)
                    continue
                latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        go.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        health = json.loads(__import__("urllib.request").request.urlopen(url + "/health").read())
    finally:
        server.terminate()
        server.wait()
    ms = np.array(latencies) * 1e3
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)),
            "failed": len(failed), "mean_batch": health["mean_batch"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=40, help="per client")
    p.add_argument("--model", choices=sorted(MODELS), default="unet")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    with tempfile.TemporaryDirectory() as tmp:
        path, shape = run_dir(Path(tmp), args.model)
        print(
            f"{args.model} {shape}, {args.clients} concurrent clients x {args.requests} single-sample requests"
        )
        rows = {
            "one forward pass per request (peer)": measure(path, shape, args.clients, args.requests,
                                                           ["--max-batch", "1"]),
            f"caldera serve, dynamic batching ({args.max_wait_ms:g} ms)": measure(
                path, shape, args.clients, args.requests, ["--max-batch", "64", "--max-wait-ms", str(args.max_wait_ms)]),
        }  # fmt: skip
    peer = next(iter(rows.values()))["rps"]
    for name, r in rows.items():
        print(f"  {name:<45} {r['rps']:7.0f} req/s  x{r['rps'] / peer:.2f}   p50 {r['p50']:6.1f} ms   "
              f"p95 {r['p95']:6.1f} ms   p99 {r['p99']:6.1f} ms   failed {r['failed']}   "
              f"mean batch {r['mean_batch']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
