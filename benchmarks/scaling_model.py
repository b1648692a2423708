"""A scaling model of synchronous data parallel: alpha-beta-gamma costs fitted here, predictions to 1 024 nodes.

    python benchmarks/scaling_model.py [--png docs/img/scaling_model.png] [--per-node 4]   # offline, from the JSON
    sudo python benchmarks/scaling_model.py --measure    # re-measure on the virtual cluster, rewrite the JSON
    python benchmarks/scaling_model.py --smoke           # seconds: offline fit and tables, plot to a scratch file

Costs (Hockney; Thakur, Rabenseifner & Gropp 2005): a message of n bytes over a link costs alpha + n beta; summing
n bytes costs n gamma. The collectives are the ones Caldera's reducers run (``parallel/allreduce.py``,
``comm/shm.py``, ``comm/lowp.py``):

- flat (``reducer = "mpi"``): one all-reduce of each bucket over all P ranks, ring (2(P-1) alpha + 2(P-1)/P n beta
  + (P-1)/P n gamma) or recursive halving/doubling (2 log2 P alpha, same bytes);
- hierarchical (``reducer = "shm"``): each of the L ranks of a node sums its 1/L share of the bucket out of the
  node's shared window (memory, n gamma for the node, two node barriers), then all-reduces its share with the
  ranks holding it on the other N nodes (the L shares cross the node's one network link side by side), and
  reads the result in place (no broadcast copy);
- 16-bit wire (``grad_comm = "bf16"``): values are rounded to 16 bits (a cast), moved by an all-to-all (N-1
  messages a rank, whatever the algorithm) and an all-gather, summed in fp32 and widened back: half the bytes of
  fp32, but latency linear in the ranks.

A step is forward + backward + optimizer of one rank alone (measured), with the buckets of ``bucket_mb`` (the
first 1 MiB, as ``comm/buckets.py`` builds them) ready as backward reaches them (backward = 2/3 of the compute,
spread evenly over the gradient bytes: an assumption). With ``overlap`` the network part of a bucket runs while
backward goes on; the summing and casting always take the compute's own time (CPU ranks: the same cores).

The link constants are fitted to ``scaling_measurements.json`` (written by ``--measure``: MPI all-reduce of 4 KiB
to 64 MiB within a node and across the virtual cluster's 10 and 1 Gbit/s links, Caldera's reducers themselves
across 2 nodes x 2 ranks, and the MLP of bench_data_parallel.py trained across the links); the interconnects of
the predictions (InfiniBand EDR/HDR, RoCE, NVLink) are published line rates and latencies, listed in
``INTERCONNECTS``. Prints markdown tables (fit, error against every measured point, predictions, published
anchors, advice) and draws efficiency against nodes with the measured points (``--png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DATA = HERE.parent / "scaling_measurements.json"
VCLUSTER = ROOT / "tests" / "cluster" / "vcluster.sh"
KIB, MIB = 1 << 10, 1 << 20
SIZES = [4 * KIB * 4**k for k in range(8)]  # 4 KiB .. 64 MiB
LINKS = ["10gbit 20us", "1gbit 100us"]
MLP_MODES = ["nocomm", "caldera", "caldera-bf16", "caldera-mpi", "caldera-mpi-bf16"]


# -- worker: runs inside each rank (--worker MODE SIZE...) ------------------------------------------------------------
def worker(mode: str, sizes: list[int]) -> None:
    """Time one all-reduce of each size (median over repeats of the slowest rank); rank 0 prints one JSON line.

    ``mpi``: MPI ``Allreduce`` of fp32 over all ranks; ``shm`` / ``shm-bf16``: Caldera's node reducer
    (``comm/shm.py``: shared window within a node, MPI between nodes), fp32 or bf16 wire; ``lowp``: Caldera's
    16-bit sum over all ranks (``comm/lowp.py``, the mpi reducer's bf16 wire).
    """
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    times: dict[int, float] = {}
    for nbytes in sizes:
        run, close = _collective(mode, world, torch.ones(nbytes // 4))
        repeats = 20 if nbytes <= 256 * KIB else 8 if nbytes <= 4 * MIB else 3
        samples = []
        run()  # warm-up: connections, pages
        for _ in range(repeats):
            world.Barrier()
            t = time.perf_counter()
            run()
            samples.append(time.perf_counter() - t)
        slowest = np.array(samples)
        world.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
        times[nbytes] = float(np.median(slowest))
        world.Barrier()
        close()
    if world.Get_rank() == 0:
        print("RESULT " + json.dumps({str(k): v for k, v in times.items()}), flush=True)


def _collective(mode: str, world, grads):
    """(run, close) for one reduction of ``grads`` over ``world`` the way ``mode`` (worker()) makes it."""
    import torch
    from mpi4py import MPI

    if mode == "mpi":
        return lambda: world.Allreduce(MPI.IN_PLACE, grads.numpy()), lambda: None
    if mode.startswith("shm"):
        from caldera.comm.shm import NodeReducer

        wire = torch.bfloat16 if mode.endswith("bf16") else None
        node = NodeReducer(world, grads.numel(), wire)

        def run() -> None:
            node.reduce(0, grads.numel(), grads if wire is not None else None)
            node.finish()

        return run, node.close
    from caldera.comm.lowp import LowPrecisionSum
    from caldera.comm.mpi import MPIComm

    lowp = LowPrecisionSum(MPIComm(world), torch.bfloat16)
    job = lowp.job(grads)
    return lambda: lowp.start(job).wait(), lowp.close


# -- measuring: root, the virtual cluster (--measure) -----------------------------------------------------------------
def cluster_env() -> dict[str, str]:
    """A cluster of this script's own (prefix, state, subnet), beside any other one on the machine."""
    exe_dir = os.path.dirname(sys.executable)
    return {**os.environ, "VCLUSTER_PREFIX": "csm", "VCLUSTER_STATE": "/run/caldera-vcsm",
            "VCLUSTER_SUBNET": "10.213.19", "MPIEXEC": os.path.join(exe_dir, "mpiexec"),
            "PATH": f"{exe_dir}:{os.environ['PATH']}:/usr/sbin:/sbin",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "vnode0", "MASTER_PORT": "29561",
            "GLOO_SOCKET_IFNAME": "eth0"}  # fmt: skip


def vcluster(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        ["bash", str(VCLUSTER), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"vcluster.sh {' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def on_cluster(env: dict[str, str], n: int, cmd: list[str], per_node: int | None = None) -> str:
    mapping = ["--map-by", f"ppr:{per_node}:node"] if per_node else []
    extra = ["-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "GLOO_SOCKET_IFNAME"]
    return vcluster(env, "mpiexec", "-n", str(n), *mapping, *extra, *cmd)


def allreduce_times(env: dict[str, str], n: int, mode: str, sizes: list[int], per_node: int | None = None):
    out = on_cluster(env, n, [sys.executable, str(HERE), "--worker", mode, *map(str, sizes)], per_node)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return {int(k): v for k, v in json.loads(line[7:]).items()}


def local_costs() -> dict[str, float]:
    """Seconds per fp32 byte of summing (a += b), of rounding fp32 to bf16 and of widening it back (1 thread)."""
    import torch

    torch.set_num_threads(1)
    n = 16 * MIB // 4
    a, b, h = torch.ones(n), torch.ones(n), torch.empty(n, dtype=torch.bfloat16)
    ops = {"gamma": lambda: a.add_(b), "cast_round": lambda: h.copy_(a), "cast_widen": lambda: a.copy_(h),
           "zero": lambda: b.zero_()}  # fmt: skip
    out = {}
    for name, op in ops.items():
        op()
        samples = []
        for _ in range(15):
            t = time.perf_counter()
            op()
            samples.append(time.perf_counter() - t)
        out[name] = statistics.median(samples) / (4 * n)
    return out


def heat_unet_step() -> dict[str, float]:
    """The main job's model (examples/heat_surrogate.toml): parameters and one rank's step time (batch 32, 1 thread)."""
    import torch

    from caldera.models import UNetSmall

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNetSmall(in_channels=2, out_channels=1, channels=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.randn(32, 2, 32, 32), torch.randn(32, 1, 32, 32)
    samples = []
    for i in range(25):
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 5:
            samples.append(time.perf_counter() - t)
    return {"params": sum(p.numel() for p in model.parameters()), "batch": 32,
            "param_sizes": [p.numel() for p in reversed(list(model.parameters()))],
            "step_s": statistics.median(samples)}  # fmt: skip


def mlp_rate(env: dict[str, str], mode: str, batch: int, steps: int) -> float:
    cmd = [sys.executable, str(HERE.parent / "bench_data_parallel.py"), "--worker", "mlp", mode, str(batch),
           str(steps), "sgd"]  # fmt: skip
    out = on_cluster(env, 4, cmd)
    return float(next(ln for ln in out.splitlines() if ln.startswith("samples/s=")).split("=")[1])


def measure(path: Path, batch: int, steps: int) -> None:
    """Bring up a cluster of this script's own, measure everything the fit and the check need, write ``path``."""
    env = cluster_env()
    check = subprocess.run(["bash", str(VCLUSTER), "check"], capture_output=True, text=True, env=env)
    if check.returncode == 3:
        raise SystemExit(f"scaling_model --measure: {(check.stdout or check.stderr).strip()}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data: dict = {"measured": started, "host": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
                  "command": "sudo python benchmarks/scaling_model.py --measure", "local": local_costs(),
                  "heat_unet": heat_unet_step(), "allreduce": [], "mlp": []}  # fmt: skip
    print(json.dumps(data["local"]), json.dumps(data["heat_unet"]), flush=True)

    def record(link: str, nodes: int, per_node: int, mode: str, sizes: list[int]) -> None:
        times = allreduce_times(env, nodes * per_node, mode, sizes, per_node)
        data["allreduce"].append({"link": link, "nodes": nodes, "per_node": per_node, "mode": mode,
                                  "seconds": {str(k): v for k, v in times.items()}})  # fmt: skip
        print(f"{link:12s} {nodes}x{per_node} {mode:8s}", " ".join(f"{v * 1e3:.3g}" for v in times.values()),
              "ms", flush=True)  # fmt: skip

    try:
        vcluster(env, "up", "--nodes", "2", "--link", LINKS[0])
        record("memory", 1, 2, "mpi", SIZES)  # both ranks on node 0: MPI's shared-memory transport
        for link in LINKS:
            vcluster(env, "shape", link)
            record(link, 2, 1, "mpi", SIZES)
            big = [s for s in SIZES if s >= 64 * KIB]
            for mode in ("mpi", "shm", "shm-bf16", "lowp"):
                record(link, 2, 2, mode, big)
            for mode in MLP_MODES:
                rate = mlp_rate(env, mode, batch, steps)
                data["mlp"].append({"link": link, "nodes": 2, "per_node": 2, "mode": mode, "batch": batch,
                                    "samples_s": rate})  # fmt: skip
                print(f"{link:12s} MLP {mode:18s} {rate:.1f} samples/s", flush=True)
        vcluster(env, "up", "--nodes", "4", "--link", LINKS[-1])
        record(LINKS[-1], 4, 1, "mpi", SIZES)
    finally:
        subprocess.run(["bash", str(VCLUSTER), "down"], capture_output=True, env=env)
    data["load_end"] = round(os.getloadavg()[0], 1)
    from caldera.io import atomic_write_text  # importing caldera costs seconds: only the writers pay it

    atomic_write_text(path, json.dumps(data, indent=1) + "\n")  # a run that fails half-way keeps the old one
    print(f"wrote {path}")


# -- the model ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """Hockney's costs of one link class: ``alpha`` seconds a message, ``beta`` seconds a byte."""

    alpha: float
    beta: float


@dataclass(frozen=True)
class Machine:
    """Where a job runs: ``per_node`` ranks a node, links within and between nodes, and a rank's own work per
    fp32 byte: ``gamma`` (a += b), ``zero``, ``cast`` (round to 16 bits) and ``widen`` (back to fp32)."""

    name: str
    intra: Link
    inter: Link
    gamma: float
    zero: float
    cast: float
    widen: float
    per_node: int = 1


@dataclass(frozen=True)
class Job:
    """One rank's work: ``params`` fp32 gradients, ``step_s`` a step alone (forward + backward + optimizer) on
    ``batch`` samples."""

    name: str
    params: int
    step_s: float
    batch: int
    source: str = ""
    gpu: bool = False  # its ranks are GPUs: NVLink within a node, sums and casts at GPU memory speed
    # its parameters' sizes in the order their gradients arrive (empty: cut into equal pieces)
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Knobs:
    """How the gradients are reduced. Defaults: Caldera's ``allreduce`` today (``reducer = "auto"``, i.e. the
    hierarchical shm reducer on CPU nodes, whose between-node step blocks; 25 MiB buckets; fp32 wire)."""

    hierarchical: bool = True
    algo: str = "ring"  # ring | hd (recursive halving/doubling, Rabenseifner)
    bucket_mb: float = 25.0
    overlap: bool = False  # the network part runs while backward goes on
    wire: str = "fp32"  # fp32 | bf16

    def label(self) -> str:
        return (f"{'hier' if self.hierarchical else 'flat'} {self.algo}, {self.bucket_mb:g} MiB, "
                f"{'overlap' if self.overlap else 'blocking'}, {self.wire}")  # fmt: skip


DEFAULT = Knobs()
# |predicted / measured - 1| over the points the constants were fitted to, as measured on 2026-12-05 (median 18 %,
# max 89 %: the 64 MiB copy within a node under load); docs/benchmarks.md states them, the test holds them.
FIT_ERROR_MEDIAN, FIT_ERROR_MAX = 0.25, 1.0
# comm/buckets.py: the first bucket is smaller, so communication starts early in backward
FIRST_BUCKET = 1 * MIB
BACKWARD = 2 / 3  # share of a step's compute in backward (forward : backward about 1 : 2): an assumption


def _log2(p: int) -> int:
    return math.ceil(math.log2(p)) if p > 1 else 0


def allreduce(n: float, p: int, link: Link, gamma: float, algo: str = "ring", flows: int = 1) -> float:
    """Seconds for an fp32 all-reduce of ``n`` bytes over ``p`` parties; ``flows`` of them share each link."""
    if p <= 1:
        return 0.0
    steps = 2 * (p - 1) if algo == "ring" else 2 * _log2(p)
    return steps * link.alpha + 2 * (p - 1) / p * n * link.beta * flows + (p - 1) / p * n * gamma


def lowp_sum(
    n: float, p: int, link: Link, m: Machine, algo: str = "ring", flows: int = 1, cross: float | None = None
):
    """(network, compute) seconds of ``comm/lowp.py`` on ``n`` fp32 bytes over ``p`` ranks: an all-to-all of
    16-bit shares (p - 1 messages whatever the algorithm), an fp32 sum, an all-gather; rounding and widening.
    ``cross``: the all-to-all's bytes through each network link, in 16-bit buffers (default (p - 1) / p: one rank
    a node; flat over N nodes of L ranks, L (N - 1) / N: every local rank's shares for the other nodes)."""
    if p <= 1:
        return 0.0, 0.0
    half = n / 2
    cross = (p - 1) / p if cross is None else cross
    alltoall = (p - 1) * link.alpha + cross * half * link.beta * flows
    gather = ((p - 1) if algo == "ring" else _log2(p)) * link.alpha + (p - 1) / p * half * link.beta * flows
    return alltoall + gather, n * (m.cast + m.widen) + (p - 1) / p * n * m.gamma


def bucket_cost(n: float, nodes: int, m: Machine, k: Knobs) -> tuple[float, float]:
    """(network, compute) seconds to reduce one bucket of ``n`` fp32 bytes over ``nodes`` x ``m.per_node`` ranks,
    as the code does it (module docstring)."""
    L, p = m.per_node, nodes * m.per_node
    if p == 1:
        return 0.0, 0.0
    if k.hierarchical and L > 1:
        # comm/shm.py: two node barriers, each rank sums its 1/L share of the L slots (and zeroes them), then the
        # L shares cross the node's link side by side; the result is read in place.
        cpu = 2 * _log2(L) * m.intra.alpha + (L - 1) / L * n * m.gamma + n * m.zero
        if k.wire == "bf16":
            cpu += n * (m.cast + m.zero)  # each rank rounds its own gradients into its 16-bit slot
            net, more = lowp_sum(n / L, nodes, m.inter, m, k.algo, flows=L)
            return net, cpu + more
        return allreduce(n / L, nodes, m.inter, m.gamma, k.algo, flows=L), cpu
    if nodes == 1:  # flat, inside one node
        if k.wire == "bf16":
            return lowp_sum(n, p, m.intra, m, k.algo)
        return allreduce(n, p, m.intra, m.gamma, k.algo), 0.0
    if k.wire == "bf16":  # flat lowp over all ranks: every local rank's shares for other nodes cross its link
        return lowp_sum(n, p, m.inter, m, k.algo, cross=L * (nodes - 1) / nodes)
    if k.algo == "ring":  # ranks in node order: one ring edge leaves each node, at the slow link's latency
        return allreduce(n, p, m.inter, m.gamma, "ring"), 0.0
    # halving/doubling, nearest partners first: log2 L steps in the node, then the L ranks' shares side by side
    inside = allreduce(n, L, m.intra, m.gamma, "hd")
    return inside + allreduce(n / L, nodes, m.inter, m.gamma, "hd", flows=L), 0.0


def buckets(job: Job, bucket_mb: float) -> list[float]:
    """Bucket sizes in bytes as ``comm/buckets.py`` cuts them: whole parameters (in the order their gradients
    arrive, each padded to 64 bytes) until a bucket holds at least its limit, the first limit 1 MiB."""
    limit, out, size = min(FIRST_BUCKET, bucket_mb * MIB), [], 0
    for numel in job.sizes or _pieces(job.params):
        if size and size >= limit:
            out.append(size)
            size, limit = 0, bucket_mb * MIB
        size += -(-numel // 16) * 16 * 4
    return [*out, size] if size else out


def _pieces(params: int, piece: int = 1 << 16) -> list[int]:
    """A gradient of no known layers, as tensors of 64 Ki numbers (256 KiB: buckets close within that of their
    limit)."""
    return [piece] * (params // piece) + ([params % piece] if params % piece else [])


def step_time(job: Job, m: Machine, nodes: int, k: Knobs = DEFAULT) -> float:
    """Seconds a step takes on every rank: the compute, the reductions' own compute, and whatever network time
    backward does not hide (with ``overlap``; without it every bucket's network time adds)."""
    if nodes * m.per_node == 1:
        return job.step_s
    cut = buckets(job, k.bucket_mb)
    total = sum(cut)
    clock = job.step_s * (1 - BACKWARD)  # forward and optimizer (the optimizer follows, but costs the same)
    net_free = 0.0
    for b in cut:
        clock += job.step_s * BACKWARD * b / total  # this bucket's gradients are complete
        net, cpu = bucket_cost(b, nodes, m, k)
        clock += cpu
        if k.overlap:
            net_free = max(clock, net_free) + net
        else:
            clock += net
    return max(clock, net_free)


def efficiency(job: Job, m: Machine, nodes: int, k: Knobs = DEFAULT) -> float:
    """Weak scaling: one rank's step time alone over the step time on ``nodes`` nodes."""
    return job.step_s / step_time(job, m, nodes, k)


def jitter_factor(ranks: int, cv: float) -> float:
    """How much longer a synchronous step takes when every rank's compute wanders independently (coefficient of
    variation ``cv``): the slowest of P normal draws is about mean + sigma sqrt(2 ln P)."""
    return 1 + cv * math.sqrt(2 * math.log(ranks)) if ranks > 1 else 1.0


def samples_per_s(job: Job, m: Machine, nodes: int, k: Knobs = DEFAULT) -> float:
    return nodes * m.per_node * job.batch / step_time(job, m, nodes, k)


# -- fitting ------------------------------------------------------------------------------------------------------------
def fit_link(seconds: dict[int, float], gamma: float) -> Link:
    """alpha and beta from all-reduces of 2 parties (2 alpha + n beta + n gamma / 2), least squares on relative
    error (so that 4 KiB and 64 MiB weigh alike)."""
    n = np.array([float(s) for s in seconds])
    t = np.array(list(seconds.values()))
    a, b = np.linalg.lstsq(np.stack([1 / t, n / t], axis=1), np.ones_like(t), rcond=None)[0]
    return Link(alpha=max(a / 2, 1e-7), beta=max(b - gamma / 2, 1e-13))


def fitted(data: dict) -> dict[str, Machine]:
    """The machines measured here, one per link class, constants fitted to ``data`` (``per_node`` = 1)."""
    loc = data["local"]
    gamma = loc["gamma"]
    by = {(r["link"], r["nodes"], r["per_node"], r["mode"]): r["seconds"] for r in data["allreduce"]}
    secs = lambda key: {int(s): v for s, v in by[key].items()}  # noqa: E731
    memory = fit_link(secs(("memory", 1, 2, "mpi")), gamma)
    out = {}
    for link in LINKS:
        net = fit_link(secs((link, 2, 1, "mpi")), gamma)
        out[link] = Machine(f"virtual cluster, {link}", memory, net, gamma, loc["zero"], loc["cast_round"],
                            loc["cast_widen"])  # fmt: skip
    out["memory"] = Machine(
        "one node", memory, memory, gamma, loc["zero"], loc["cast_round"], loc["cast_widen"]
    )
    return out


MODE_KNOBS = {  # what each measured mode runs, in the model's terms (parallel/allreduce.py, comm/shm.py)
    "mpi": Knobs(hierarchical=False, overlap=False),
    "shm": Knobs(hierarchical=True, overlap=False),
    "shm-bf16": Knobs(hierarchical=True, overlap=False, wire="bf16"),
    "lowp": Knobs(hierarchical=False, overlap=False, wire="bf16"),
    # The trained MLP. shm's MPI step between nodes blocks. The mpi reducer's Iallreduce (and its bf16 sums) advance
    # only when a hook tests them, and the MLP's 6 parameters make 2 buckets and 6 hook calls a step: with no
    # progress thread that is close to no overlap (modelled with overlap, the flat rows came out 36-43 % too fast).
    "caldera": Knobs(hierarchical=True, overlap=False),
    "caldera-bf16": Knobs(hierarchical=True, overlap=False, wire="bf16"),
    "caldera-mpi": Knobs(hierarchical=False, overlap=False),
    "caldera-mpi-bf16": Knobs(hierarchical=False, overlap=False, wire="bf16"),
}
# bench_data_parallel.py's MLP (1024-2048-2048-10), its parameters in the order their gradients arrive
MLP_SIZES = (10, 2048 * 10, 2048, 2048 * 2048, 2048, 1024 * 2048)
MLP_PARAMS = sum(MLP_SIZES)


def checks(data: dict, machines: dict[str, Machine]) -> list[dict]:
    """Every measured point beside the model's prediction for it."""
    rows = []
    for r in data["allreduce"]:
        m = replace(machines[r["link"]], per_node=r["per_node"])
        for size, seconds in r["seconds"].items():
            net, cpu = bucket_cost(float(size), r["nodes"], m, MODE_KNOBS[r["mode"]])
            rows.append({"what": f"all-reduce {r['mode']}", "link": r["link"], "layout": f"{r['nodes']}x{r['per_node']}",
                         "size": int(size), "measured": seconds, "predicted": net + cpu,
                         "fit": r["per_node"] * r["nodes"] == 2})  # fmt: skip
    mlp = [r for r in data["mlp"]]
    for link in {r["link"] for r in mlp}:
        alone = next(r for r in mlp if r["link"] == link and r["mode"] == "nocomm")
        m = replace(machines[link], per_node=alone["per_node"])
        ranks = alone["nodes"] * alone["per_node"]
        job = Job(
            "MLP", MLP_PARAMS, alone["batch"] / alone["samples_s"], alone["batch"] // ranks, sizes=MLP_SIZES
        )
        for r in mlp:
            if r["link"] == link and r["mode"] != "nocomm":
                rows.append({"what": f"MLP {r['mode']}", "link": link, "layout": f"{r['nodes']}x{r['per_node']}",
                             "size": 4 * MLP_PARAMS, "measured": r["samples_s"],
                             "predicted": samples_per_s(job, m, r["nodes"], MODE_KNOBS[r["mode"]]),
                             "fit": False})  # fmt: skip
    earlier = data.get("mlp_earlier", {}).get("runs", [])
    for link in {r["link"] for r in earlier}:
        # No "no communication" run that hour: take the compute time that makes the model meet the hierarchical
        # fp32 row, and predict the other rows from it (ratios between rows of one link, as cluster.md advises).
        runs = {r["mode"]: r for r in earlier if r["link"] == link}
        ref = runs["caldera"]
        m = replace(machines[link], per_node=ref["per_node"])
        ranks = ref["nodes"] * ref["per_node"]
        lo, hi = 1e-4, 100.0
        for _ in range(60):  # samples/s falls as the step's compute grows
            mid = (lo * hi) ** 0.5
            job = Job("MLP", MLP_PARAMS, mid, ref["batch"] // ranks, sizes=MLP_SIZES)
            if samples_per_s(job, m, ref["nodes"], MODE_KNOBS["caldera"]) > ref["samples_s"]:
                lo = mid
            else:
                hi = mid
        for mode, r in runs.items():
            if mode != "caldera":
                rows.append({"what": f"MLP {mode} (earlier run)", "link": link, "layout": f"{r['nodes']}x{r['per_node']}",
                             "size": 4 * MLP_PARAMS, "measured": r["samples_s"],
                             "predicted": samples_per_s(job, m, r["nodes"], MODE_KNOBS[mode]), "fit": False})  # fmt: skip
    return rows


def error(row: dict) -> float:
    """Relative error of the prediction (positive: the model is slower/too pessimistic for times)."""
    return row["predicted"] / row["measured"] - 1


# -- published interconnects, jobs and anchors ------------------------------------------------------------------------
GBIT = 1e9 / 8  # bytes/s
WIRE_EFFICIENCY = 0.9  # what a large message gets of the line rate (headers, protocol): an assumption
INTERCONNECTS = {  # alpha: MPI one-way latency of a small message (vendor and OSU figures: 1-2 us on InfiniBand)
    "IB EDR 100 Gbit/s": Link(alpha=1.5e-6, beta=1 / (WIRE_EFFICIENCY * 100 * GBIT)),
    "IB HDR 200 Gbit/s": Link(alpha=1.0e-6, beta=1 / (WIRE_EFFICIENCY * 200 * GBIT)),
    "RoCE 25 Gbit/s": Link(alpha=5e-6, beta=1 / (WIRE_EFFICIENCY * 25 * GBIT)),
    "2x IB EDR (Summit)": Link(alpha=1.5e-6, beta=1 / (WIRE_EFFICIENCY * 200 * GBIT)),
}
GPU_NODE = {  # within a GPU node: PCIe 3 x16 ~12 GB/s (Horovod's servers), NVLink 2 ~50 GB/s (Summit); NVLink of
    # A100/H100 nodes ~200 GB/s (the bus bandwidth nccl-tests report there); 5 µs a step: assumptions
    "PCIe 3": Link(alpha=5e-6, beta=1 / 12e9),
    "NVLink 2": Link(alpha=5e-6, beta=1 / 50e9),
    "NVLink": Link(alpha=5e-6, beta=1 / 200e9),
}
JITTER = 0.02  # step-time spread of one rank for the stragglers column (this host's lockstep rows: 4-16 %)
GPU_GAMMA = (
    1 / 500e9
)  # a GPU sums at ~memory bandwidth: 4 bytes read twice, written once per value, ~1.5 TB/s
RESNET50 = Job(
    "ResNet-50 gradient (25.6 M), A100",
    25_557_032,
    256 / 2600,
    256,
    "compute assumed: ~2 600 images/s at batch 256 on one A100 with AMP, channels-last (timm's benchmark, "
    "pytorch-image-models issue 1491)",
    gpu=True,
)
ANCHORS = [  # (what, job, nodes, ranks a node, link within, link between, knobs, published efficiency)
    (
        "Horovod, ResNet-101, 512 P100 (128 nodes x 4), 25 Gbit/s RoCE [Sergeev & Del Balso 2018]",
        Job(
            "ResNet-101", 44_549_160, 64 / 130, 64, "130 img/s at batch 64 on a P100 (interpolated by FLOPs)"
        ),
        128,
        4,
        "PCIe 3",
        "RoCE 25 Gbit/s",
        Knobs(hierarchical=False, bucket_mb=64, overlap=True),
        0.90,
    ),
    (
        "Horovod, VGG-16, same cluster",
        Job("VGG-16", 138_357_544, 64 / 154, 64, "154 img/s at batch 64 on a P100"),
        128,
        4,
        "PCIe 3",
        "RoCE 25 Gbit/s",
        Knobs(hierarchical=False, bucket_mb=64, overlap=True),
        0.68,
    ),
    (
        "Kurth et al. 2018, DeepLabv3+, 27 360 V100 (4 560 nodes x 6), 2x EDR, fp32",
        Job(
            "DeepLabv3+",
            43_600_000,
            2.2,
            2,
            "~44 M params, ~2.2 s a step at batch 2 (our reading of the paper)",
        ),
        4560,
        6,
        "NVLink 2",
        "2x IB EDR (Summit)",
        Knobs(hierarchical=True, algo="hd", overlap=True),
        0.907,
    ),
]


H200_EPOCH_S, H200_STEPS = (
    0.25,
    53,
)  # docs/benchmarks.md: the main job on one H200, ~0.25 s an epoch of 53 steps


def heat_unet(data: dict) -> list[Job]:
    """The main job's U-Net with its step time measured here on a CPU rank, and on the H200 lent on 2026-11-29."""
    h = data["heat_unet"]
    sizes = tuple(h.get("param_sizes", ()))
    return [Job("heat U-Net, CPU rank", h["params"], h["step_s"], h["batch"],
                f"measured here: one rank, 1 thread, batch {h['batch']}", sizes=sizes),
            Job("heat U-Net, H200", h["params"], H200_EPOCH_S / H200_STEPS, h["batch"],
                "measured on one H200: ~0.25 s an epoch of 53 steps of 32 (docs/benchmarks.md)", gpu=True,
                sizes=sizes)]  # fmt: skip


def cluster(machines: dict[str, Machine], job: Job, link: str, per_node: int) -> Machine:
    """Nodes of ``per_node`` ranks joined by the published interconnect ``link``: CPU ranks as measured here
    (shared memory, sums and casts fitted on this machine), or GPUs (NVLink, sums at GPU memory speed)."""
    if job.gpu:
        return Machine(f"{per_node} GPUs/node, {link}", GPU_NODE["NVLink"], INTERCONNECTS[link], GPU_GAMMA,
                       GPU_GAMMA / 2, GPU_GAMMA, GPU_GAMMA, per_node)  # fmt: skip
    here = machines["memory"]
    return replace(
        here, name=f"{per_node} CPU ranks/node, {link}", inter=INTERCONNECTS[link], per_node=per_node
    )


def knob_grid() -> list[Knobs]:
    return [Knobs(h, a, b, o, w) for h in (True, False) for a in ("ring", "hd") for b in (1, 4, 8, 25, 64, 256)
            for o in (False, True) for w in ("fp32", "bf16")]  # fmt: skip


def changes(k: Knobs) -> list[str]:
    """The knobs ``k`` turns away from Caldera's default, in words."""
    out = []
    if k.hierarchical != DEFAULT.hierarchical:
        out.append("flat reducer" if not k.hierarchical else "hierarchical reducer")
    if k.algo != DEFAULT.algo:
        out.append("halving/doubling between nodes" if k.algo == "hd" else "ring")
    if k.overlap != DEFAULT.overlap:
        out.append("overlap (non-blocking between-node step)" if k.overlap else "no overlap")
    if k.wire != DEFAULT.wire:
        out.append(f"{k.wire} wire")
    if k.bucket_mb != DEFAULT.bucket_mb:
        out.append(f"{k.bucket_mb:g} MiB buckets")
    return out


def advise(job: Job, m: Machine, nodes: int, target: float = 0.9) -> tuple[Knobs, float, list[str]]:
    """The fewest knob changes from the default that reach ``target`` efficiency (the best such); else the best."""
    scored = [(efficiency(job, m, nodes, k), k) for k in knob_grid()]
    ok = [(len(changes(k)), -e, k) for e, k in scored if e >= target]
    if ok:
        _, e, k = min(ok, key=lambda t: (t[0], t[1]))
        return k, -e, changes(k)
    e, k = max(scored, key=lambda t: t[0])
    return k, e, changes(k)


# -- output -------------------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def size_label(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


SHOWN_SIZES = {4 * KIB, 256 * KIB, 4 * MIB, 64 * MIB}
NODES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def report(data: dict, per_node: int, png: Path | None, smoke: bool = False, verbose: bool = False) -> dict:
    """Fit, check, predict, compare, advise; print markdown; draw ``png``. Returns the figures the tests read."""
    machines = fitted(data)
    print(f"Measurements: {data['measured']} ({data['host']}; `{data['command']}`)\n")
    print(
        "Fitted constants (alpha: latency a message, beta: inverse bandwidth, gamma: summing, per fp32 byte):\n"
    )
    rows = [[name, f"{m.inter.alpha * 1e6:.1f} µs", f"{1 / m.inter.beta / 1e9:.2f} GB/s ({8 / m.inter.beta / 1e9:.2g} Gbit/s)"]
            for name, m in machines.items()]  # fmt: skip
    print(table(["link class", "alpha", "1/beta"], rows))
    loc = data["local"]
    print(f"\ngamma (a += b): {1 / loc['gamma'] / 1e9:.1f} GB/s; round to bf16 {1 / loc['cast_round'] / 1e9:.1f} GB/s, "
          f"widen {1 / loc['cast_widen'] / 1e9:.1f} GB/s, zero {1 / loc['zero'] / 1e9:.1f} GB/s (fp32 bytes, 1 thread)\n")  # fmt: skip

    rows_c = checks(data, machines)
    print("Model against the measured points (time for all-reduces, samples/s for the MLP; error = predicted / "
          f"measured - 1; {'every size' if verbose else 'four sizes, --verbose for all'}):\n")  # fmt: skip
    out_rows = []
    for r in (
        rows_c if verbose else [r for r in rows_c if r["size"] in SHOWN_SIZES or r["what"].startswith("MLP")]
    ):
        unit = (
            (lambda v: f"{v * 1e3:.3g} ms") if r["what"].startswith("all-reduce") else (lambda v: f"{v:.0f}")
        )
        size = size_label(r["size"]) if r["what"].startswith("all-reduce") else "25 MB"
        out_rows.append([r["what"] + (" (fit)" if r["fit"] else ""), r["link"], r["layout"], size,
                         unit(r["measured"]), unit(r["predicted"]), f"{100 * error(r):+.0f} %"])  # fmt: skip
    print(table(["what", "link", "nodes x ranks", "size", "measured", "predicted", "error"], out_rows))
    fit_err = [abs(error(r)) for r in rows_c if r["fit"]]
    held = [abs(error(r)) for r in rows_c if not r["fit"] and r["what"].startswith("all-reduce")]
    mlp_err = [abs(error(r)) for r in rows_c if r["what"].startswith("MLP") and "earlier" not in r["what"]]
    earlier_err = [abs(error(r)) for r in rows_c if "earlier" in r["what"]]
    summary = {"fit_median": statistics.median(fit_err), "fit_max": max(fit_err),
               "held_median": statistics.median(held) if held else float("nan"),
               "mlp_median": statistics.median(mlp_err) if mlp_err else float("nan"),
               "earlier_median": statistics.median(earlier_err) if earlier_err else float("nan")}  # fmt: skip
    print(f"\n|error|: fitted points median {pct(summary['fit_median'])} (max {pct(summary['fit_max'])}); "
          f"points not fitted (2x2, 4x1 all-reduces) median {pct(summary['held_median'])}; "
          f"MLP training median {pct(summary['mlp_median'])} (this run), {pct(summary['earlier_median'])} (the earlier "
          "run's rows, from its hierarchical fp32 row)\n")  # fmt: skip

    jobs = [*heat_unet(data), RESNET50]
    link = "IB HDR 200 Gbit/s"
    print(f"Predictions: weak scaling, {per_node} ranks a node (CPU ranks: shared memory, sums and casts as fitted "
          "here; GPUs: NVLink and GPU memory speed, assumed), published interconnects. Efficiency = one rank alone / "
          "step time; samples/s over all ranks.\n")  # fmt: skip
    variants = [
        ("default (hier ring, 25 MiB, blocking, fp32)", DEFAULT),
        ("+ overlap", replace(DEFAULT, overlap=True)),
        ("+ overlap + bf16 wire", replace(DEFAULT, overlap=True, wire="bf16")),
        ("flat ring, overlap", replace(DEFAULT, hierarchical=False, overlap=True)),
        ("hier halving/doubling, overlap", replace(DEFAULT, algo="hd", overlap=True)),
        ("hier h/d, overlap, 4 MiB buckets", replace(DEFAULT, algo="hd", overlap=True, bucket_mb=4)),
    ]
    show = [2, 16, 128, 1024] if not smoke else [2, 1024]
    preds = {}
    for job in jobs:
        print(f"**{job.name}**: {job.params / 1e6:.2f} M parameters ({4 * job.params / MIB:.1f} MiB fp32), "
              f"{job.step_s * 1e3:.0f} ms a step alone ({job.source})\n")  # fmt: skip
        rows = []
        for ic in ("IB EDR 100 Gbit/s", link):
            m = cluster(machines, job, ic, per_node)
            for label, k in variants:
                effs = [efficiency(job, m, n, k) for n in show]
                preds[(job.name, ic, label)] = effs
                rows.append([ic, label, *(pct(e) for e in effs), f"{samples_per_s(job, m, show[-1], k):.3g}"])
        print(
            table(["interconnect", "knobs", *(f"{n} nodes" for n in show), f"samples/s at {show[-1]}"], rows)
        )
        print()

    nodes = 1024 // per_node
    print(f"Bucket size at {nodes * per_node} ranks ({nodes} nodes x {per_node}), {link}, overlap on, fp32 "
          "(hierarchical, ring / halving-doubling between nodes):\n")  # fmt: skip
    rows = []
    for mb in (1, 4, 8, 25, 64, 256):
        row = [f"{mb} MiB"]
        for job in jobs:
            m = cluster(machines, job, link, per_node)
            row += [
                pct(efficiency(job, m, nodes, Knobs(algo=a, bucket_mb=mb, overlap=True)))
                for a in ("ring", "hd")
            ]
        rows.append(row)
    print(table(["bucket", *(f"{j.name}: {a}" for j in jobs for a in ("ring", "h/d"))], rows))
    print()

    print("Published anchors, and what the model says for similar settings (the last column adds stragglers: each "
          f"rank's compute wandering by {pct(JITTER)} (assumed), so that every step waits for the slowest):\n")  # fmt: skip
    rows = []
    for what, job, nodes, L, intra, inter, k, published in ANCHORS:
        m = Machine(
            what, GPU_NODE[intra], INTERCONNECTS[inter], GPU_GAMMA, GPU_GAMMA / 2, GPU_GAMMA, GPU_GAMMA, L
        )
        e = efficiency(job, m, nodes, k)
        late = job.step_s / (
            step_time(job, m, nodes, k) + job.step_s * (jitter_factor(nodes * L, JITTER) - 1)
        )
        rows.append([what, f"{job.params / 1e6:.1f} M, {job.step_s * 1e3:.0f} ms", k.label(), pct(published),
                     pct(e), pct(late)])  # fmt: skip
    print(
        table(["run", "model, step alone", "knobs assumed", "published", "model", "model + stragglers"], rows)
    )

    advice = {}
    for nodes in (1024 // per_node, 1024):
        print(f"\nAdvice: the fewest changes from the default that reach 90 % at {nodes * per_node} ranks ({nodes} "
              f"nodes x {per_node}), {link}:\n")  # fmt: skip
        for job in jobs:
            m = cluster(machines, job, link, per_node)
            k, e, what = advise(job, m, nodes)
            base = efficiency(job, m, nodes)
            verdict = ("needs " + " + ".join(what) if what else "default suffices") if e >= 0.9 else \
                "cannot reach 90 %; best: " + " + ".join(what)  # fmt: skip
            advice[job.name, nodes] = (k, e, base)
            print(f"- {job.name}: default {pct(base)}; {verdict} -> {pct(e)} ({k.label()})")
    if png is not None:
        plot(png, data, machines, jobs, per_node, link)
        print(f"\nplot: {png}")
    return {"machines": machines, "checks": rows_c, "summary": summary, "advice": advice, "preds": preds}


def plot(
    png: Path, data: dict, machines: dict[str, Machine], jobs: list[Job], per_node: int, link: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    # Left: the MLP on the virtual cluster, predicted against nodes, measured points at 2 nodes.
    mlp = data["mlp"]
    colors = {"caldera": "C0", "caldera-bf16": "C1", "caldera-mpi": "C2", "caldera-mpi-bf16": "C3"}
    for ls, lk in zip(("-", "--"), LINKS):
        alone = next(r for r in mlp if r["link"] == lk and r["mode"] == "nocomm")
        job = Job(
            "MLP", MLP_PARAMS, alone["batch"] / alone["samples_s"], alone["batch"] // 4, sizes=MLP_SIZES
        )
        m = replace(machines[lk], per_node=2)
        xs = [1, 2, 4, 8, 16]
        for mode, c in colors.items():
            left.plot(xs, [efficiency(job, m, n, MODE_KNOBS[mode]) for n in xs], ls, color=c,
                      label=f"{mode}, {lk.split()[0]}")  # fmt: skip
            r = next((r for r in mlp if r["link"] == lk and r["mode"] == mode), None)
            if r:
                left.plot([2], [r["samples_s"] / alone["samples_s"]], "o" if ls == "-" else "s", color=c)
    left.set(xscale="log", xlabel="nodes (2 ranks each)", ylabel="efficiency (vs. no communication)",
             title="MLP on the virtual cluster: model (lines), measured (markers)", ylim=(0, 1.05))  # fmt: skip
    left.legend(fontsize=7)
    # Right: the jobs on InfiniBand HDR, default and advised knobs; the anchors.
    for job, c in zip(jobs, ("C0", "C1", "C3")):
        m = cluster(machines, job, link, per_node)
        k, _, _ = advise(job, m, 1024 // per_node)
        for knobs, ls, tag in ((DEFAULT, "--", "default"), (k, "-", "advised")):
            right.plot(
                NODES, [efficiency(job, m, n, knobs) for n in NODES], ls, color=c, label=f"{job.name}: {tag}"
            )
    for (what, job, nodes, L, intra, inter, k, published), mk in zip(ANCHORS, "^vD"):
        name = ",".join(what.split(",")[:2])
        m = Machine(
            what, GPU_NODE[intra], INTERCONNECTS[inter], GPU_GAMMA, GPU_GAMMA / 2, GPU_GAMMA, GPU_GAMMA, L
        )
        right.plot([nodes], [published], mk, color="k", label=f"{name}: published")
        right.plot([nodes], [efficiency(job, m, nodes, k)], mk, color="k", mfc="none", label=f"{name}: model")
    right.axhline(0.9, color="grey", lw=0.5)
    right.set(xscale="log", xlabel=f"nodes ({per_node} ranks each)", ylabel="efficiency", ylim=(0, 1.05),
              title=f"Predicted on {link}")  # fmt: skip
    right.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    from caldera.io import atomic_write  # importing caldera costs seconds: only the writers pay it

    atomic_write(png, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--measure", action="store_true", help="measure on the virtual cluster (root)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--batch", type=int, default=256, help="--measure: the MLP's global batch")
    parser.add_argument("--steps", type=int, default=5, help="--measure: the MLP's timed steps")
    parser.add_argument("--per-node", type=int, default=4, help="ranks a node in the predictions")
    parser.add_argument(
        "--png", type=Path, help="draw efficiency against nodes here (e.g. docs/img/scaling_model.png)"
    )
    parser.add_argument("--verbose", action="store_true", help="the error of every measured size")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="seconds: offline, plot to a scratch file")
    args = parser.parse_args()
    if not 1 <= args.per_node <= 1024:
        parser.error(f"--per-node must be 1..1024 (ranks a node), not {args.per_node}")
    if args.worker:
        worker(args.worker[0], [int(s) for s in args.worker[1:]])
        return
    if args.measure:
        measure(args.data, args.batch, args.steps)
        return
    if not args.data.exists():
        raise SystemExit(
            f"scaling_model: no measurements at {args.data}: run with --measure (root) or pass --data"
        )
    data = json.loads(args.data.read_text())
    png = Path(tempfile.mkdtemp()) / "scaling_model.png" if args.smoke else args.png
    report(data, args.per_node, png, smoke=args.smoke, verbose=args.verbose)


if __name__ == "__main__":
    main()
