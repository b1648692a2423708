"""Data parallel between nodes: Caldera hierarchical (shm) vs flat MPI vs DDP-gloo, across shaped links.

    sudo python benchmarks/bench_cluster.py [--nodes 2] [--per-node 2] [--links "10gbit 20us" "1gbit 100us"]
                                            [--steps 10] [--repeats 1] [--batch 256] [--buckets 5 100]
                                            [--models mlp] [--modes caldera caldera-blocking ... ddp-fp16]

Brings up the virtual cluster of tests/cluster/ under a name of its own (root, network namespaces), and for each
link shape runs bench_data_parallel.py's worker for each of ``--models`` (``mlp``: 6.3 M parameters, 25 MB of fp32
gradients, the default; ``cnn``: 1.1 M parameters, 4 MB, a conv net with real compute; ``grad25m``: ResNet-50's 53
conv weights and fc as cheap linear branches, 25.5 M parameters in 55 tensors, 100 MB: a ResNet-50-sized gradient
at a fraction of its compute) on NODES x PER_NODE ranks: Caldera ``allreduce`` with the shm reducer (hierarchical:
shared memory inside a node, MPI over TCP between nodes) and the mpi reducer (flat), each with the fp32 and the bf16 wire; the shm reducer
with its step between nodes blocking (``-blocking``: the earlier path) and with 5 MB buckets; DDP-gloo as
default, tuned (``gradient_as_bucket_view``, ``static_graph``, bucket sizes swept) and with its fp16 compression
hook. A link such as "1gbit 100us loss 5%" drops that share of the packets between nodes. Before that it measures what each link delivers (tests/cluster/probe.py). Prints samples/s (medians) and
the ratio to tuned DDP's best. Every "node" shares this machine's cores: read ratios, not speed-ups. Without
namespaces it prints vcluster.sh's reason and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
VCLUSTER = ROOT / "tests" / "cluster" / "vcluster.sh"
WORKER = [sys.executable, str(HERE.parent / "bench_data_parallel.py"), "--worker"]
# --smoke: one node pair, one rank each, Caldera (mpi between the nodes) only, a few small steps.
SMOKE = {"nodes": 2, "per_node": 1, "links": ["1gbit 100us"], "steps": 2, "batch": 16, "repeats": 1,
         "modes": ["caldera-mpi"], "buckets": [], "models": ["mlp"]}  # fmt: skip
MODES = ["caldera", "caldera-blocking", "caldera-bf16", "caldera-bf16-blocking", "caldera-b5", "caldera-mpi",
         "caldera-mpi-bf16", "ddp", "ddp-tuned", "ddp-fp16"]  # fmt: skip
LABELS = {"caldera": "Caldera hierarchical (shm), fp32 wire", "caldera-bf16": "Caldera hierarchical (shm), bf16 wire",
          "caldera-blocking": "Caldera hierarchical, fp32, blocking", "caldera-bf16-blocking": "Caldera hierarchical, bf16, blocking",
          "caldera-b5": "Caldera hierarchical, fp32, 5 MB buckets",
          "caldera-mpi": "Caldera flat (mpi), fp32 wire", "caldera-mpi-bf16": "Caldera flat (mpi), bf16 wire",
          "ddp": "DDP-gloo default", "ddp-tuned": "DDP-gloo tuned, 25 MB buckets",
          "ddp-fp16": "DDP-gloo + fp16 compression hook"}  # fmt: skip


def cluster_env() -> dict[str, str]:
    exe_dir = os.path.dirname(sys.executable)
    return {**os.environ, "VCLUSTER_PREFIX": f"cvb{os.getpid()}", "VCLUSTER_STATE": f"/run/caldera-vcb-{os.getpid()}",
            "MPIEXEC": os.path.join(exe_dir, "mpiexec"), "PATH": f"{exe_dir}:{os.environ['PATH']}:/usr/sbin:/sbin",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "vnode0", "MASTER_PORT": "29541", "GLOO_SOCKET_IFNAME": "eth0"}  # fmt: skip


def vcluster(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``vcluster.sh ARGS``; on a timeout its whole process group (mpiexec, the output's watchers) is killed."""
    with subprocess.Popen(["bash", str(VCLUSTER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ranks(env: dict[str, str], n: int, cmd: list[str], timeout: float = 120, retry: bool = True) -> str:
    """stdout of ``cmd`` on ``n`` ranks spread over the nodes (DDP's rendezvous address passed on)."""
    try:
        proc = vcluster(env, "mpiexec", "-n", str(n), "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x",
                        "GLOO_SOCKET_IFNAME", *cmd, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        # gloo's teardown can hang after a complete, timed run (as in bench_data_parallel.py): keep the measurement.
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        if "samples/s=" in out:
            print(
                f"  (warning: {' '.join(cmd[-4:])} hung after measuring; killed after {timeout:g} s)",
                flush=True,
            )
            return out
        raise
    if proc.returncode != 0 and retry and "A daemon failed to report back" in proc.stdout + proc.stderr:
        # Seen once under a load of ~15: Open MPI's daemon on the other node did not call back in time; nothing ran.
        print(f"  (warning: {' '.join(cmd[-4:])}: a daemon did not report back; started again)", flush=True)
        return ranks(env, n, cmd, timeout, retry=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--per-node", type=int, default=2)
    parser.add_argument("--links", nargs="+", default=["10gbit 20us", "1gbit 100us"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch", type=int, help="global batch (default: 256; grad25m: 2 per rank)")
    parser.add_argument("--models", nargs="+", default=["mlp"], choices=["mlp", "cnn", "grad25m"],
                        help="bench_data_parallel.py's worker models (default: mlp)")  # fmt: skip
    parser.add_argument("--buckets", nargs="*", type=float, default=[5.0, 100.0],
                        help="more bucket sizes (MB) for tuned DDP")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES, help="which rows (default: all)")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    env = cluster_env()
    check = vcluster(env, "check")
    if check.returncode == 3:
        print(f"skipped: {(check.stdout or check.stderr).strip()} (0 measurements)")
        return
    modes = args.modes + [f"ddp-tuned-{b:g}" for b in args.buckets]
    n = args.nodes * args.per_node
    up = vcluster(env, "up", "--nodes", str(args.nodes), "--link", args.links[0])
    if up.returncode != 0:
        raise SystemExit(f"bench_cluster: the virtual cluster did not come up:\n{up.stdout}{up.stderr}")
    try:
        batch = {m: args.batch or (2 * n if m == "grad25m" else 256) for m in args.models}
        print(f"{args.nodes} nodes x {args.per_node} ranks x 1 thread, models {' '.join(args.models)}, global batch "
              f"{' '.join(f'{m} {b}' for m, b in batch.items())}, {args.steps} timed steps, {args.repeats} repeat(s) "
              f"(medians)")  # fmt: skip
        for link in args.links:
            print(vcluster(env, "shape", link).stdout.strip(), flush=True)
            probe = json.loads(
                ranks(env, args.nodes, [sys.executable, str(VCLUSTER.parent / "probe.py"), "16"])
            )
            print(f"\nlink '{link}': delivers {probe['gbit_s']:.2f} Gbit/s, 8-byte latency {probe['latency_us']:.0f} µs "
                  f"(ping-pong between two nodes)", flush=True)  # fmt: skip
            rates = {(k, m): [] for k in args.models for m in modes}
            for _ in range(args.repeats):
                for kind in args.models:
                    for mode in modes:
                        cmd = [*WORKER, kind, mode, str(batch[kind]), str(args.steps), "sgd"]
                        rate = re.search(r"samples/s=([\d.]+)", ranks(env, n, cmd)).group(1)
                        rates[kind, mode].append(float(rate))
                        print(f"    {kind} {mode}: {rates[kind, mode][-1]:.1f} samples/s", flush=True)
                # The machine may be shared: what else ran shows in the load average.
                print(f"  (load average {os.getloadavg()[0]:.1f} after this repeat)", flush=True)
            for kind in args.models:
                med = {m: statistics.median(rates[kind, m]) for m in modes}
                tuned = [m for m in med if m.startswith("ddp-tuned")]
                best = max(tuned, key=med.get) if tuned else None
                print(f"  {kind} (global batch {batch[kind]}):")
                for mode in modes:
                    label = LABELS.get(mode) or f"DDP-gloo tuned, {mode.rsplit('-', 1)[1]} MB buckets"
                    ratio = f"  x{med[mode] / med[best]:.2f} best tuned DDP" if best else ""
                    ms = 1000 * batch[kind] / med[mode]
                    print(f"  {label:40s} {med[mode]:7.1f} samples/s {ms:6.0f} ms/step{ratio}")
    finally:
        vcluster(env, "down")


if __name__ == "__main__":
    main()
