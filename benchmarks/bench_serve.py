"""caldera serve vs LitServe (dynamic batching) vs a plain FastAPI endpoint, one client, one run, same model.

    python benchmarks/bench_serve.py [--clients 16,64,256] [--requests 20] [--model unet|mlp] [--repeat 1]
    python benchmarks/bench_serve.py --smoke      # seconds; LitServe / FastAPI rows skipped when not installed

Every server answers ``POST /predict`` with JSON ``{"inputs": [sample]}`` -> ``{"outputs": [...]}`` from the same
run directory (an untrained heat-surrogate U-Net, or an MLP) loaded with ``caldera.coupling.Surrogate``:

- ``caldera serve RUN --max-batch B --max-wait-ms W`` (the standard-library server, dynamic batching);
- LitServe with dynamic batching on (``LitAPI(max_batch_size=B, batch_timeout=W)``), one worker on the CPU as its
  docs suggest for a CPU model (``accelerator="cpu"``), its default uvicorn API server;
- FastAPI on uvicorn, one forward pass per request (what a hand-written endpoint does).

The client is the same for all: N threads, each with its own kept-alive ``http.client`` connection, all starting
at once, single-sample JSON requests. Printed per server and concurrency: completed requests/s, p50 and p99
latency, failed requests (a non-200 reply or a reset connection), and caldera's ratio to LitServe.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from caldera.config import Config
from caldera.coupling.surrogate import Surrogate
from caldera.train.run import build_model

MODELS = {
    "unet": (
        {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1, "channels": 16}},
        (2, 32, 32),
    ),
    "mlp": ({"name": "mlp", "args": {"sizes": [1024, 2048, 2048, 10]}}, (1024,)),
}

# --smoke: 4 clients x 3 requests, the MLP-free U-Net, one concurrency level.
SMOKE = {"clients": "4", "requests": 3}


def run_dir(root: Path, model: str) -> tuple[Path, tuple[int, ...]]:
    spec, shape = MODELS[model]
    cfg = Config.model_validate({"model": spec, "data": {"source": "heat"}})
    path = root / model
    path.mkdir()
    (path / "config.resolved.json").write_text(json.dumps(cfg.model_dump(), default=str))
    torch.manual_seed(0)
    torch.save(build_model(cfg).state_dict(), path / "model.pt")
    return path, shape


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the two peers, each started as `python bench_serve.py --peer litserve|fastapi RUN PORT B W` ---------------


try:  # optional: the LitServe row is skipped without it
    import litserve as ls
except ImportError:
    ls = None

if ls is not None:

    class LitServeAPI(ls.LitAPI):
        """The model behind LitServe: one batch of decoded requests per predict (at module level: it is pickled)."""

        def __init__(self, run: str, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.run = run

        def setup(self, device: str) -> None:
            self.model = Surrogate.from_run(self.run, device="cpu")

        def decode_request(self, request: dict) -> np.ndarray:
            return np.asarray(request["inputs"], dtype=np.float32)

        def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(inputs)

        def predict(self, x: np.ndarray) -> np.ndarray:
            return np.asarray(self.model(x))

        def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
            return [output[i : i + 1] for i in range(len(output))]

        def encode_response(self, output: np.ndarray) -> dict:
            return {"outputs": output.tolist()}


def litserve_main(run: str, port: int, max_batch: int, max_wait_s: float) -> None:
    api = LitServeAPI(run, max_batch_size=max_batch, batch_timeout=max_wait_s)
    workers, fast = int(os.environ.get("LIT_WORKERS", "1")), os.environ.get("LIT_FAST_QUEUE") == "1"
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers, timeout=60, fast_queue=fast)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


def fastapi_main(run: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    model = Surrogate.from_run(run, device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: dict) -> dict:  # a sync endpoint: FastAPI runs it in its thread pool
        return {"outputs": np.asarray(model(np.asarray(request["inputs"], dtype=np.float32))).tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the client ---------------------------------------------------------------------------------------------------


def wait_ready(port: int, proc: subprocess.Popen, path: str = "/health", limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with {proc.returncode} before answering {path}: "
                f"{proc.stderr.read()[-2000:] if proc.stderr else ''}"
            )
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer on {path} within {limit_s} s")


def load(port: int, body: bytes, clients: int, requests: int) -> dict[str, float]:
    """``clients`` threads, each ``requests`` POSTs on its own kept-alive connection, all starting at once."""
    latencies: list[float] = []
    failed: list[str] = []
    go = threading.Barrier(clients + 1)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        go.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:  # counted; the client reconnects and goes on
                failed.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            if response.status != 200 or b"outputs" not in data:
                failed.append(str(response.status))
                continue
            latencies.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies or [float("nan")]) * 1e3
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "failed": len(failed)}  # fmt: skip


def measure(cmd: list[str], port: int, body: bytes, levels: list[int], requests: int) -> list[dict]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, proc)
        load(port, body, 8, 5)  # warm-up: the first passes of a model, and a peer's worker processes
        return [load(port, body, c, requests) for c in levels]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="16,64,256", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--model", choices=sorted(MODELS), default="unet")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=1, help="whole runs, one after the other")
    p.add_argument("--only", default="caldera,litserve,fastapi", help="servers to run, comma-separated")
    p.add_argument("--peer", nargs=5, metavar=("KIND", "RUN", "PORT", "B", "W"), help=argparse.SUPPRESS)
    p.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one level (the test suite runs this)"
    )
    args = p.parse_args()
    if args.peer:
        kind, run, port, b, w = args.peer
        return (
            litserve_main(run, int(port), int(b), float(w))
            if kind == "litserve"
            else fastapi_main(run, int(port))
        )
    if args.smoke:
        vars(args).update(SMOKE)
    levels = [int(c) for c in args.clients.split(",")]
    env_cmd = [sys.executable, os.path.abspath(__file__)]
    with tempfile.TemporaryDirectory() as tmp:
        path, shape = run_dir(Path(tmp), args.model)
        x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
        body = json.dumps({"inputs": x.tolist()}).encode()
        wait = args.max_wait_ms / 1e3
        servers = {
            "caldera": lambda port: [sys.executable, "-m", "caldera.cli", "serve", str(path), "--port", str(port),
                                     "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)],
            "litserve": lambda port: [*env_cmd, "--peer", "litserve", str(path), str(port), str(args.max_batch),
                                      str(wait)],
            "fastapi": lambda port: [*env_cmd, "--peer", "fastapi", str(path), str(port), "1", "0"],
        }  # fmt: skip
        needs = {"litserve": "litserve", "fastapi": "uvicorn"}
        print(f"{args.model} {shape}: single-sample JSON requests, {args.requests} per client, kept-alive "
              f"connections; batching {args.max_batch} samples / {args.max_wait_ms:g} ms")  # fmt: skip
        for rep in range(args.repeat):
            rows: dict[str, list[dict]] = {}
            for name in args.only.split(","):
                if name in needs and not have(needs[name]):
                    print(f"  {name}: not installed (pip install {name}); row skipped")
                    continue
                port = free_port()
                rows[name] = measure(servers[name](port), port, body, levels, args.requests)
            print(f"run {rep + 1}:")
            for i, c in enumerate(levels):
                for name, rs in rows.items():
                    r = rs[i]
                    ratio = ""
                    if "litserve" in rows and name != "litserve":
                        ratio = f"  x{r['rps'] / rows['litserve'][i]['rps']:.2f} LitServe's req/s"
                    print(f"  {c:4d} clients  {name:<9} {r['rps']:7.0f} req/s   p50 {r['p50']:7.1f} ms   "
                          f"p99 {r['p99']:7.1f} ms   failed {r['failed']}{ratio}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
