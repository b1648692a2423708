"""Model-parallel serving: ``caldera serve RUN --tp 2`` on 2 ranks vs. the whole model in one process.

    python benchmarks/bench_tensor_serve.py [--dim 2048] [--layers 4] [--clients 8] [--requests 25]
    python benchmarks/bench_tensor_serve.py --smoke      # seconds: a tiny model, a few requests, --tp 2 only

The run is the built-in ``transformer`` of ``examples/digits_tensor.toml`` with random weights in ``model.pt``
(written into a temporary directory). Each server is started as a user would (``caldera serve``, and ``mpiexec -n 2
caldera serve --tp 2``); N client threads, each with its own kept-alive ``http.client`` connection, send single-sample
JSON requests. Printed per server: requests/s, and per rank the peak RSS (VmHWM), the resident anonymous memory
(RssAnon: what the process holds) and the resident file pages (RssFile: the memory-mapped weights it read), read
from ``/proc/PID/status`` after the requests; then every rank gets SIGTERM and must exit 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from caldera.config import load_config
from caldera.train.run import build_model
from caldera.train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def make_run(run: Path, dim: int, layers: int) -> int:
    """A run directory holding the transformer's random weights; return its parameter count."""
    values = {"run.dir": str(run), "model.args.dim": dim, "model.args.heads": 8, "model.args.layers": layers}
    cfg = load_config(ROOT / "examples/digits_tensor.toml", values=values)
    torch.manual_seed(0)
    model = build_model(cfg)
    RunDir(run).save_config(cfg)
    RunDir(run).save_weights(model)
    return sum(p.numel() for p in model.parameters())


def memory(pid: int) -> tuple[int, int, int]:
    """(peak RSS, resident anonymous, resident file pages) of ``pid`` in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return tuple(
        int(re.search(rf"{key}:\s+(\d+)", text).group(1)) // 1024 for key in ("VmHWM", "RssAnon", "RssFile")
    )


def ranks(run: Path) -> list[int]:
    """The processes serving ``run``: Python ones whose arguments name it (not mpiexec, whose arguments do too)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            proc.name.isdigit()
            and b"python" in Path(argv[0].decode()).name.encode()
            and str(run).encode() in argv
        ):
            found.append(int(proc.name))
    return found


def serve(cmd: list[str], run: Path, clients: int, requests: int) -> tuple[float, list[tuple[int, int, int]]]:
    """Start ``cmd`` (a caldera serve of ``run`` on a free port), time the clients, read each rank's memory, stop it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([*cmd, "--port", "0", "--max-wait-ms", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    try:
        port = None
        for line in proc.stdout:
            if "http://" in line:
                port = int(line.split("http://")[1].split()[0].rsplit(":", 1)[1])
                break
        if port is None:
            raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
        pids = ranks(run)
        body = json.dumps({"inputs": [np.random.default_rng(0).random(64).tolist()]})
        done: list[int] = []

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            for _ in range(requests):
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                reply = conn.getresponse()
                reply.read()
                if reply.status == 200:
                    done.append(1)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        used = [memory(p) for p in pids]
        for (
            p
        ) in pids:  # what a scheduler does: every rank gets SIGTERM; rank 0 drains and releases the others
            os.kill(p, signal.SIGTERM)
        proc.communicate(timeout=120)
        if proc.returncode != 0 or len(done) != clients * requests:
            raise RuntimeError(
                f"{cmd[0]}: exit {proc.returncode}, {len(done)} of {clients * requests} answered"
            )
        return len(done) / seconds, used
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument(
        "--smoke", action="store_true", help="seconds: a tiny model, a few requests (the test suite)"
    )
    args = p.parse_args()
    if args.smoke:
        args.dim, args.layers, args.clients, args.requests = 32, 1, 2, 3
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    caldera = [sys.executable, "-m", "caldera.cli", "serve"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        n = make_run(run, args.dim, args.layers)
        print(f"transformer dim {args.dim}, {args.layers} blocks: {n:,} parameters ({4 * n / 2**20:.0f} MiB fp32); "
              f"{args.clients} clients x {args.requests} single-sample JSON requests", flush=True)  # fmt: skip
        rows = [("one process", [*caldera, str(run)]),
                ("--tp 2, 2 ranks", [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", "2", *caldera, str(run),
                                     "--tp", "2"])]  # fmt: skip
        print("| server | requests/s | peak RSS per rank | resident anonymous | resident file |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, cmd in rows[1:] if args.smoke else rows:  # smoke: the model-parallel row only (test time)
            rate, used = serve(cmd, run, args.clients, args.requests)
            peak, anon, file = (" / ".join(f"{u[i]:,} MiB" for u in used) for i in range(3))
            print(f"| {name} | {rate:.1f} | {peak} | {anon} | {file} |", flush=True)


if __name__ == "__main__":
    main()
