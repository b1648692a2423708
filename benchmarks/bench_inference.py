"""What does it cost to call a model? Per-call latency, throughput and memory across runtimes, against compute.

    python benchmarks/bench_inference.py [--models closure_mlp unet potential mlp_6m] [--runtimes ...]
                                         [--batches 1 64] [--seconds 2] [--threads 1] [--results DIR] [--png PNG]

The "zero-cost abstraction" study of issue 19. Four models, each with weights from seed 0:
  closure_mlp  MLP 8-64-64-4, the kind a simulation calls per cell;
  unet         the heat surrogate, UNetSmall(in 2, out 1, channels 16) on 2x32x32 fields;
  potential    the materials potential (NeuralPotential(hidden 64), 13 atoms): energy AND forces = -dE/dx;
  mlp_6m       MLP 1024-2048-2048-10 (6.3 M parameters, the data-parallel benchmark's model).
Runtimes, all on the CPU with ``--threads`` threads (default 1; intra-op threads of every engine and OMP):
  eager        Python, the nn.Module under torch.inference_mode (the potential: its own forward, which needs
               autograd for the forces, so no inference mode);
  compile      torch.compile(dynamic=False) default mode; compile-max: mode="max-autotune-no-cudagraphs";
  ts-py        TorchScript (torch.jit.trace; the potential: torch.jit.script of its forward) from Python;
  ts-cpp       the same file from C++ (torch::jit::load: libtorch eager), benchmarks/native/bench_native.cpp;
  aoti-py      AOTInductor package (torch.export + aoti_compile_and_package) via torch._inductor.aoti_load_package;
  aoti-cpp     the same package from C++ (torch::inductor::AOTIModelPackageLoader);
  ort          ONNX Runtime (torch.onnx.export(dynamo=True)), configured for latency as its docs recommend:
               intra_op_num_threads = --threads, graph optimisation level ALL, sequential execution;
  capi-cpp / capi-fortran   Caldera's C API (native/, libcaldera) from C++ and from Fortran, via native/'s own
               timing programs; reported "not built" while native/ is absent or does not build.
The potential's forces come from autograd, which neither torch.export nor ONNX can trace: for export, ONNX and
torch.compile its forward + backward is first traced into one plain ATen graph (make_fx), which they all compile.

Each (model, runtime, batch) runs in its own process: every call is timed alone (perf_counter_ns / steady_clock)
for --seconds after a warm-up; p50 and p99 of the calls, throughput = batch x calls / time. Memory: the peak
resident set (VmHWM, reset after the warm-up) minus the resident set before the model was loaded, i.e. weights,
compiled code and workspace, excluding one-off compile peaks. Every runtime's output is checked against eager.
Compute limit: this CPU's measured fp32 rate of a 1024^3 GEMM (torch.mm, same threads) and each model's FLOPs
(torch.utils.flop_counter: matmuls and convolutions only), floor = FLOPs / rate; also "layers alone": each
Linear/Conv layer of the model timed on its own input, summed (what PyTorch's kernels need for the math alone).

Compiled artefacts and the C++ harness are cached under build/bench-native, keyed by model, torch version and
inductor options, so reruns skip compilation. Results: a table on stdout, results.json and latency.png in
--results (default build/bench-native/results); --png also writes the plot there (docs/img/... for the docs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

from caldera.export.formats import aoti_configs
from caldera.io import atomic_write_text
from caldera.models import MLP, NeuralPotential, UNetSmall

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "bench-native"
NATIVE = ROOT / "native"  # Caldera's C API (issue 19, part 2); timed when present and it builds

MODELS = {
    "closure_mlp": ("MLP 8-64-64-4", (8,)),
    "unet": ("heat U-Net, 2x32x32", (2, 32, 32)),
    "potential": ("potential E+F, 13 atoms", (13, 3)),
    "mlp_6m": ("MLP 1024-2048-2048-10 (6.3 M)", (1024,)),
}
PYTHON_RUNTIMES = ("eager", "compile", "compile-max", "ts-py", "aoti-py", "ort")
CPP_RUNTIMES = ("ts-cpp", "aoti-cpp")
CAPI_RUNTIMES = ("capi-cpp", "capi-fortran")
RUNTIMES = (*PYTHON_RUNTIMES, *CPP_RUNTIMES, *CAPI_RUNTIMES)
# --smoke: the closure MLP only, the Python rows without AOTInductor (its compile alone takes ~10 s here) and the
# C++ harness built and run on the TorchScript file, a fraction of a second per row.
SMOKE = {
    "models": ["closure_mlp"],
    "runtimes": ["eager", "ts-py", "ort", "ts-cpp"],
    "batches": [1, 4],
    "seconds": 0.05,
}
TOLERANCE = 1e-4  # max |runtime - eager| / (max |eager| + 1): fp32 kernels reorder sums, nothing more


class EnergyForces(nn.Module):
    """The potential's energy and forces written so torch.jit.script compiles it (TorchScript has no enable_grad)."""

    def __init__(self, potential: NeuralPotential) -> None:
        super().__init__()
        self.descriptors, self.atom_mlp = potential.descriptors, potential.atom_mlp

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """Return (n, 1 + 3N) = [energy, forces] of positions (n, N, 3); needs grad mode on."""
        pos = pos.detach().requires_grad_(True)
        energy = self.atom_mlp(self.descriptors(pos)).squeeze(-1).sum(-1)
        grad = torch.autograd.grad([energy.sum()], [pos])[0]
        assert grad is not None
        return torch.cat([energy.detach()[:, None], -grad.flatten(1)], 1)


class AtenGraph(nn.Module):
    """A module's forward *and* the backward it runs inside (autograd.grad), traced into one plain ATen graph.

    torch.export, ONNX and torch.compile cannot trace autograd.grad inside a forward; make_fx can, and what it
    records (the derivative as ordinary ops) all of them compile. The weights stay buffers, not constants."""

    def __init__(self, module: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        self.names = list(state)
        for i, name in enumerate(self.names):
            self.register_buffer(f"w{i}", state[name].detach().clone())

        def call(tensors: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(module, dict(zip(self.names, tensors)), (x,))

        # symbolic: the batch stays a symbol, so the graph (and what is exported from it) takes any batch
        self.graph = make_fx(call, tracing_mode="symbolic")(list(state.values()), example)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the traced graph on x."""
        return self.graph([getattr(self, f"w{i}") for i in range(len(self.names))], x)


def build(name: str) -> nn.Module:
    """The eager model ``name`` with the weights of seed 0 (every process builds the same one)."""
    torch.manual_seed(0)
    if name == "closure_mlp":
        model: nn.Module = MLP([8, 64, 64, 4])
    elif name == "unet":
        model = UNetSmall(in_channels=2, out_channels=1, channels=16)
    elif name == "potential":
        model = NeuralPotential(hidden=64, layers=2, atom_energy=-3.0)
    else:
        model = MLP([1024, 2048, 2048, 10])
    return model.eval().requires_grad_(False)


def graph_module(name: str, model: nn.Module) -> nn.Module:
    """What torch.export, ONNX and torch.compile get: the model, or for the potential its traced E+F graph."""
    return AtenGraph(model, example(name, 4)) if name == "potential" else model


def example(name: str, batch: int) -> torch.Tensor:
    """The fixed input of ``batch`` samples every runtime is timed and checked on."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *MODELS[name][1], generator=g)
    if name == "potential":  # atoms on a jittered lattice ~1.1 apart, inside each other's cutoff
        lattice = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)[:13]
        x = 1.1 * lattice + 0.05 * x
    return x


def eager_call(name: str, model: nn.Module):
    """A function running the eager model as a Python user would."""
    if name == "potential":
        return model  # its forward turns autograd on for the forces; inference mode would forbid that

    def run(x):
        with torch.inference_mode():
            return model(x)

    return run


# ---------------------------------------------------------------------------------------------------- artefacts
def cache_key(name: str, inductor: dict) -> str:
    """Model, torch version, inductor options and the model code: what the compiled artefacts depend on."""
    models = ROOT / "src" / "caldera" / "models"
    code = "".join(p.read_text() for p in sorted(models.glob("*.py"))) + HERE.read_text()
    digest = hashlib.sha256((code + json.dumps(inductor, sort_keys=True)).encode()).hexdigest()[:12]
    return f"{name}-torch{torch.__version__}-{digest}"


def shape_spec(name: str, shape: tuple[int, ...]) -> str:
    """The contract's ``name:float32:-1,d1,...`` (batch dynamic)."""
    return f"{name}:float32:" + ",".join(["-1", *map(str, shape)])


def artefacts(name: str, inductor: dict, need: set[str]) -> Path:
    """The directory holding model.ts, model.aoti.pt2 and model.onnx of ``name``: built once, then reused.

    ``need`` names the formats this run times ("ts", "aoti", "onnx"); a format not yet built is built now, into a
    temporary file moved into place when complete, so an interrupted run leaves no half-written artefact."""
    out = BUILD / "artefacts" / cache_key(name, inductor)
    out.mkdir(parents=True, exist_ok=True)
    files = {"ts": out / "model.ts", "aoti": out / "model.aoti.pt2", "onnx": out / "model.onnx"}
    todo = [f for f in ("ts", "aoti", "onnx") if f in need and not files[f].exists()]
    if not todo:
        return out
    model = build(name)
    x = example(name, 4)
    y_shape = tuple(eager_call(name, model)(x).shape[1:])
    batch = torch.export.Dim("batch", min=1, max=4096)
    for fmt in todo:
        t0 = time.perf_counter()
        tmp = out / f".{fmt}-{os.getpid()}.tmp"
        if fmt == "ts":
            ts = (
                torch.jit.script(EnergyForces(model)) if name == "potential" else torch.jit.trace(model, (x,))
            )
            torch.jit.save(ts, str(tmp))
        elif fmt == "aoti":
            ep = torch.export.export(graph_module(name, model), (x,), dynamic_shapes=({0: batch},))
            metadata = {"caldera.inputs": shape_spec("x", MODELS[name][1]), "caldera.outputs": shape_spec("y", y_shape),
                        "caldera.device": "cpu", "caldera.format": "1"}  # fmt: skip
            configs = {**inductor, "aot_inductor.metadata": metadata}
            tmp = tmp.with_suffix(".pt2")  # the packager insists on the suffix
            with torch.no_grad():  # inductor ignores freezing (aoti_configs) while grad mode is on
                torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=configs)
        else:
            program = torch.onnx.export(graph_module(name, model), (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                        input_names=["x"], output_names=["y"], verbose=False)  # fmt: skip
            program.save(str(tmp))
        os.replace(tmp, files[fmt])
        print(f"  built {files[fmt].relative_to(ROOT)} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------- memory
def rss_mib(field: str = "VmRSS") -> float:
    """A field of /proc/self/status in MiB (VmRSS now, VmHWM the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ------------------------------------------------------------------------------------------------------- timing
def time_calls(call, x, seconds: float) -> tuple[list[float], object]:
    """Per-call times (µs) of ``call(x)`` for ``seconds`` (at least 20 calls) after a warm-up; the last output."""
    warm_end = time.perf_counter() + min(0.2, seconds / 5)
    y = call(x)
    for _ in range(4):
        y = call(x)
    while time.perf_counter() < warm_end:
        y = call(x)
    reset_peak()
    times: list[float] = []
    end = time.perf_counter() + seconds
    clock = time.perf_counter_ns
    while len(times) < 20 or (time.perf_counter() < end and len(times) < 2_000_000):
        t0 = clock()
        y = call(x)
        times.append((clock() - t0) / 1e3)
    return times, y


def summary(times: list[float], batch: int) -> dict:
    """p50/p99/mean of per-call µs and samples per second."""
    q = np.percentile(times, [50, 99])
    return {"p50_us": float(q[0]), "p99_us": float(q[1]), "mean_us": statistics.fmean(times), "calls": len(times),
            "samples_per_s": batch * 1e6 / statistics.fmean(times)}  # fmt: skip


def python_runtime(name: str, runtime: str, art: Path, threads: int):
    """A function x -> output (a torch tensor or a NumPy array) running ``name`` in ``runtime`` from Python."""
    if runtime == "eager":
        return eager_call(name, build(name))
    if runtime in ("compile", "compile-max"):
        mode = "max-autotune-no-cudagraphs" if runtime == "compile-max" else None
        compiled = torch.compile(graph_module(name, build(name)), mode=mode, dynamic=False)

        def run(x):
            with torch.inference_mode():
                return compiled(x)

        return run
    if runtime == "ts-py":
        ts = torch.jit.load(str(art / "model.ts"))
        if name == "potential":
            return ts  # autograd for the forces
        return eager_call(name, ts)
    if runtime == "aoti-py":
        package = torch._inductor.aoti_load_package(str(art / "model.aoti.pt2"))
        return eager_call("", package)  # inference mode: no autograd needed, the derivative is in the graph
    if runtime == "ort":
        import onnxruntime as ort  # only this worker needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(art / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        return lambda x: session.run(None, {feed: x})[0]
    raise ValueError(runtime)


def worker(name: str, runtime: str, art: Path, threads: int, batches: list[int], seconds: float) -> None:
    """Time one (model, Python runtime) at each batch; print one JSON line per batch."""
    torch.set_num_threads(threads)
    # The eager references first, their model gone before the baseline: the memory measured is the runtime's own.
    references = {b: eager_call(name, build(name))(example(name, b)) for b in batches}
    base = rss_mib()
    t0 = time.perf_counter()
    call = python_runtime(name, runtime, art, threads)
    load_s = time.perf_counter() - t0
    for b in batches:
        x = example(name, b)
        arg = x.numpy() if runtime == "ort" else x
        t1 = time.perf_counter()
        call(arg)  # the first call compiles (torch.compile), reported apart from the steady state
        first_s = time.perf_counter() - t1
        times, y = time_calls(call, arg, seconds)
        result = summary(times, b) | {"peak_rss_growth_mib": rss_mib("VmHWM") - base}
        result |= {
            "load_s": load_s,
            "first_call_s": first_s,
            "error": rel_error(torch.as_tensor(y), references[b]),
        }
        print(json.dumps({"batch": b, **result}), flush=True)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| relative to the reference's scale."""
    y, ref = y.detach().reshape(ref.shape).float(), ref.detach()
    return float((y - ref).abs().max() / (ref.abs().max() + 1))


def run_worker(name: str, runtime: str, art: Path, args) -> dict[int, dict]:
    """Run ``worker`` in a fresh process (its memory is its own); {batch: result} or {batch: {"skip": why}}."""
    cmd = [sys.executable, str(HERE), "--worker", name, runtime, str(art), "--threads", str(args.threads),
           "--seconds", str(args.seconds), "--batches", *map(str, args.batches)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            found[r.pop("batch")] = r
    if proc.returncode or len(found) < len(args.batches):
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {b: found.get(b, {"skip": f"failed: {why}"}) for b in args.batches}
    return found


def child_env(threads: int) -> dict[str, str]:
    """Threads for every engine in a child: OpenMP (libtorch, AOTInductor kernels), MKL; one compile worker."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- C++
def cmake_build(source: Path, build_dir: Path, jobs: int = 2) -> str | None:
    """Configure and build a CMake project against the wheel's libtorch; None when built, else why not."""
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        return "no cmake / C++ compiler"
    prefix = torch.utils.cmake_prefix_path
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build_dir / "Makefile").exists() else []
    steps = [["cmake", "-S", str(source), "-B", str(build_dir), *generator, f"-DCMAKE_PREFIX_PATH={prefix}",
              "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", str(build_dir), "-j", str(jobs)]]  # fmt: skip
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            return f"{' '.join(step[:2])} failed: {' | '.join(tail)}"[:300]
    return None


def run_harness(exe: Path, kind: str, model: Path, x: torch.Tensor, ref: torch.Tensor, args) -> dict:
    """Time one artefact with the C++ harness on input x; check its output against eager ``ref``."""
    with tempfile.TemporaryDirectory() as tmp:
        xin, yout = Path(tmp) / "x.f32", Path(tmp) / "y.f32"
        x.numpy().tofile(xin)
        cmd = [str(exe), kind, str(model), str(args.threads), str(args.seconds), str(xin), str(yout),
               *map(str, x.shape)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
        if proc.returncode:
            return {"skip": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        y = torch.from_numpy(np.fromfile(yout, dtype=np.float32))
    mean = result["mean_us"]
    return result | {"samples_per_s": x.shape[0] * 1e6 / mean, "error": rel_error(y, ref)}


def capi_programs() -> tuple[dict[str, Path], str | None]:
    """Build native/ (Caldera's C API) and find its timing programs: {"capi-cpp": exe, "capi-fortran": exe}."""
    if not (NATIVE / "CMakeLists.txt").exists():
        return {}, "not built: native/ is not on this branch"
    why = cmake_build(NATIVE, BUILD / "native")
    if why:
        return {}, f"not built: {why}"
    found: dict[str, Path] = {}
    # native/bench's programs: "<name with bench>" taking MODEL BATCH ITERATIONS, one JSON line with p50/p99 µs.
    for exe in sorted((BUILD / "native").rglob("*bench*")):
        if exe.is_file() and os.access(exe, os.X_OK) and exe.suffix not in (".so", ".a", ".o", ".mod"):
            kind = (
                "capi-fortran" if any(s in exe.name.lower() for s in ("fortran", "f90", "_f")) else "capi-cpp"
            )
            found.setdefault(kind, exe)
    return found, None if found else "not built: native/ built, but no timing program (…bench…) in it"


def run_capi(exe: Path, model: Path, batch: int, estimate_us: float, args) -> dict:
    """Time Caldera's C API with native/'s own program: MODEL BATCH ITERATIONS -> one JSON line.

    It takes a count, not a duration: ``estimate_us`` (another row's p50) turns --seconds into one."""
    iters = int(min(2e6, max(20, args.seconds * 1e6 / estimate_us)))
    proc = subprocess.run([str(exe), str(model), str(batch), str(iters)], capture_output=True, text=True,
                          env=child_env(args.threads), timeout=600)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"skip": f"failed: {(proc.stderr.strip().splitlines() or ['no JSON line'])[-1][:160]}"}
    r = json.loads(lines[-1])
    # native/bench prints {"caldera_us": {"p50", "p99", "mean"}, "bare_us": {...}}: the C API, and (C++ only) the
    # bare AOTIModelPackageLoader::run it wraps, timed in the same process on the same inputs.
    call, bare = r.get("caldera_us", {}), r.get("bare_us", {})
    row = {"p50_us": call.get("p50", float("nan")), "p99_us": call.get("p99", float("nan")), "calls": iters}
    if bare:
        row |= {"bare_p50_us": bare["p50"], "overhead_us": row["p50_us"] - bare["p50"]}
    return row | {"samples_per_s": batch * 1e6 / row["p50_us"]}


# ------------------------------------------------------------------------------------------------ compute limit
def best_time(fn, repeats: int = 7, min_s: float = 0.02) -> float:
    """The fastest mean seconds per call of fn over ``repeats`` batches of calls each >= min_s."""
    fn()
    n, t0 = 1, time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_s / one))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def gemm_rates(n: int = 1024) -> dict[str, float]:
    """This CPU's fp32 GEMM rate (FLOP/s) on an n^3 product, current thread count, through three BLAS libraries.

    They differ by 2x here: the wheel's MKL takes its AVX2 path on AMD CPUs, ONNX Runtime's MLAS uses AVX-512.
    The fastest is what the CPU can do, so the floor uses it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    rates = {"torch.mm (MKL)": lambda: torch.mm(a, b), "numpy (OpenBLAS)": lambda: an @ bn}
    try:  # here, not at the top: the workers import this file, and only the ort worker's memory may hold ORT
        import onnx
        import onnxruntime as ort

        f32 = onnx.TensorProto.FLOAT
        graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                                       [onnx.helper.make_tensor_value_info(k, f32, [n, n]) for k in "AB"],
                                       [onnx.helper.make_tensor_value_info("C", f32, [n, n])])  # fmt: skip
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rates["onnxruntime MatMul (MLAS)"] = lambda: session.run(None, {"A": an, "B": bn})
    except ImportError:
        pass
    return {k: 2 * n**3 / best_time(fn, repeats=5, min_s=0.1) for k, fn in rates.items()}


def compute_limit(name: str, batch: int, rate: float) -> dict:
    """FLOPs at ``batch``, floor = FLOPs / rate, and each Linear/Conv layer timed alone on its own input, summed."""
    model = build(name)
    module = graph_module(name, model)
    x = example(name, batch)
    with FlopCounterMode(display=False) as counter:
        module(x)
    flops = counter.get_total_flops()
    layers: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inp, out: layers.append((m, inp[0].detach())))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]  # fmt: skip
    with torch.no_grad():
        model(x) if name != "potential" else model.energy(x)  # the potential's layers, forward only
    for h in hooks:
        h.remove()
    with torch.inference_mode():
        alone = sum(best_time(lambda m=m, i=i: m(i)) for m, i in layers)
    layer_flops = sum(
        2 * m.weight.numel() * (i.numel() // i.shape[-1]) for m, i in layers if isinstance(m, nn.Linear)
    )
    return {"flops": flops, "floor_us": flops / rate * 1e6, "layers_alone_us": alone * 1e6,
            "linear_layer_rate_gflops": layer_flops / alone / 1e9 if layer_flops and name.endswith("mlp") else None}  # fmt: skip


# --------------------------------------------------------------------------------------------------------- main
def fmt(v: float | None, unit: str = "") -> str:
    """A number in 4 significant digits (or the reason a row has none)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}{unit}"


def print_table(results: dict) -> None:
    """The table on stdout: one block per model and batch, every runtime against eager and the floor."""
    for name, per_batch in results["models"].items():
        for b, entry in per_batch.items():
            lim = entry["limit"]
            print(f"\n{MODELS[name][0]}, batch {b}: {lim['flops'] / 1e6:.3g} MFLOP, floor {fmt(lim['floor_us'])} µs "
                  f"at {results['gemm_gflops']:.1f} GFLOP/s, layers alone {fmt(lim['layers_alone_us'])} µs")  # fmt: skip
            print(f"  {'runtime':13s} {'p50 µs':>10s} {'p99 µs':>10s} {'samples/s':>11s} {'peak MiB':>9s} "
                  f"{'x eager':>8s} {'/ floor':>8s} {'/ layers':>8s}  error")  # fmt: skip
            eager = entry["runtimes"].get("eager", {}).get("p50_us")
            for rt, r in entry["runtimes"].items():
                if "skip" in r:
                    print(f"  {rt:13s} {r['skip']}")
                    continue
                p50 = r["p50_us"]
                print(f"  {rt:13s} {p50:10.2f} {r['p99_us']:10.2f} {r['samples_per_s']:11.4g} "
                      f"{fmt(r.get('peak_rss_growth_mib')):>9s} {fmt(eager / p50 if eager else None):>8s} "
                      f"{p50 / lim['floor_us']:8.2f} {p50 / lim['layers_alone_us']:8.2f}  "
                      f"{fmt(r.get('error'))}")  # fmt: skip


def plot(results: dict, path: Path) -> None:
    """Latency (p50, log scale) per runtime per model: one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    names = list(results["models"])
    runtimes = [rt for rt in RUNTIMES if any("p50_us" in results["models"][n][str(b)]["runtimes"].get(rt, {})
                                             for n in names for b in batches)]  # fmt: skip
    width = 0.8 / max(1, len(runtimes))
    for ax, b in zip(axes[0], batches):
        for k, rt in enumerate(runtimes):
            ys = [
                results["models"][n][str(b)]["runtimes"].get(rt, {}).get("p50_us", float("nan"))
                for n in names
            ]
            ax.bar([i + k * width for i in range(len(names))], ys, width, label=rt)
        floors = [results["models"][n][str(b)]["limit"]["floor_us"] for n in names]
        for i, f in enumerate(floors):
            ax.hlines(f, i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="--", linewidth=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], [MODELS[n][0] for n in names],
                      rotation=15, fontsize=8)  # fmt: skip
        ax.set(yscale="log", ylabel="p50 latency per call (µs)", title=f"batch {b}, {results['threads']} thread(s); "
               "dashed: compute floor")  # fmt: skip
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    os.replace(tmp.name, path)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="timed seconds per model, runtime and batch"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-defaults", action="store_true",
                        help="compile the AOTInductor packages with torch's defaults, not what `caldera export "
                        "--threads N` uses (the untuned row)")  # fmt: skip
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="an inductor option for the AOTInductor packages, e.g. freezing=True (repeatable)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=BUILD / "results")
    parser.add_argument(
        "--png", type=Path, help="also write the plot here (e.g. docs/img/inference_latency.png)"
    )
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODEL", "RUNTIME", "ARTEFACTS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        name, runtime, art = args.worker
        worker(name, runtime, Path(art), args.threads, args.batches, args.seconds)
        return
    if args.smoke:
        vars(args).update(SMOKE)
        args.results = Path.cwd() / "bench-inference-smoke"  # never over a full run's results
    # The packages are what `caldera export --threads <threads>` writes (the C API's users get them), unless asked.
    inductor = {} if args.torch_defaults else aoti_configs(args.threads)
    inductor |= {k: json.loads(v.lower()) if v.lower() in ("true", "false") or v[:1].isdigit() else v
                 for k, v in (opt.split("=", 1) for opt in args.inductor)}  # fmt: skip
    torch.set_num_threads(args.threads)
    command = " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]])
    print(f"{command}\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s) per runtime, {args.seconds} s timed per row, inductor {inductor or 'defaults'}")  # fmt: skip

    rates = gemm_rates()
    rate = max(rates.values())
    print("fp32 GEMM 1024^3: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + " GFLOP/s; "
          f"the floor uses {rate / 1e9:.1f}", flush=True)  # fmt: skip
    need = {"ts"} if {"ts-py", "ts-cpp"} & set(args.runtimes) else set()
    need |= {"aoti"} if {"aoti-py", "aoti-cpp", *CAPI_RUNTIMES} & set(args.runtimes) else set()
    need |= {"onnx"} if "ort" in args.runtimes else set()

    harness, harness_why = None, None
    if set(CPP_RUNTIMES) & set(args.runtimes):
        t0 = time.perf_counter()
        harness_why = cmake_build(HERE.parent / "native", BUILD / "harness")
        if harness_why and os.environ.get("CI"):
            sys.exit(f"bench_inference: the C++ harness must build under CI: {harness_why}")
        harness = None if harness_why else BUILD / "harness" / "bench_native"
        print(f"C++ harness: {harness_why or f'built in {time.perf_counter() - t0:.1f} s'}", flush=True)
    capi, capi_why = ({}, None)
    if set(CAPI_RUNTIMES) & set(args.runtimes):
        capi, capi_why = capi_programs()
        print(f"C API: {capi_why or ', '.join(f'{k}: {v}' for k, v in capi.items())}", flush=True)

    results: dict = {"command": command, "torch": torch.__version__, "threads": args.threads, "inductor": inductor,
                     "gemm_gflops": rate / 1e9, "gemm_rates_gflops": {k: v / 1e9 for k, v in rates.items()}, "seconds": args.seconds, "batches": args.batches, "models": {},
                     "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()}  # fmt: skip
    for name in args.models:
        art = artefacts(name, inductor, need)
        model = build(name)
        per_batch = {str(b): {"limit": compute_limit(name, b, rate), "runtimes": {}} for b in args.batches}
        rows: dict[str, dict[int, dict]] = {}
        for rt in args.runtimes:
            if rt in PYTHON_RUNTIMES:
                rows[rt] = run_worker(name, rt, art, args)
            elif rt in CPP_RUNTIMES:
                kind = "aoti" if rt == "aoti-cpp" else ("ts-grad" if name == "potential" else "ts")
                file = art / ("model.aoti.pt2" if kind == "aoti" else "model.ts")
                rows[rt] = {b: run_harness(harness, kind, file, example(name, b),
                                           eager_call(name, model)(example(name, b)), args)
                            if harness else {"skip": f"not built: {harness_why}"} for b in args.batches}  # fmt: skip
            else:
                # the C API wraps the AOTInductor package: its C++ row (else eager) sizes the iteration count
                est = {b: next((rows[r][b]["p50_us"] for r in ("aoti-cpp", "eager") if "p50_us" in rows.get(r, {})
                                .get(b, {})), 1e3) for b in args.batches}  # fmt: skip
                rows[rt] = {b: run_capi(capi[rt], art / "model.aoti.pt2", b, est[b], args) if rt in capi
                            else {"skip": capi_why or "not built"} for b in args.batches}  # fmt: skip
            for b, r in rows[rt].items():
                per_batch[str(b)]["runtimes"][rt] = r
                if "error" in r and r["error"] > TOLERANCE:
                    r["skip"] = f"wrong output: error {r['error']:.2g} against eager"
            done = rows[rt][args.batches[0]]
            print(f"  {name:12s} {rt:13s} " + (done["skip"] if "skip" in done else
                  " ".join(f"b{b}: {rows[rt][b].get('p50_us', float('nan')):.2f} µs" for b in args.batches)),
                  flush=True)  # fmt: skip
        results["models"][name] = per_batch
    print_table(results)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "results.json", json.dumps(results, indent=1))
    print(f"\nresults: {args.results / 'results.json'}")
    plot(results, args.results / "latency.png")
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
