"""native/: the C/C++/Fortran inference library, built once per session with CMake against the wheel's libtorch.

Real compilers, real AOTInductor packages, real MPI ranks: the C++ and Fortran callers must reproduce Python eager
outputs, survive a wrong path, shape and dtype, and the Fortran heat example must run under mpiexec -n 2."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from caldera.export import export
from caldera.models import MLP
from caldera.predict import load_run_config
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir
from tests.conftest import ROOT, tiny_run

CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
SYSTEM_MPIEXEC = "/usr/bin/mpiexec"  # the Debian Open MPI that has Fortran bindings (pip's has none)


def need(tool: str, hint: str) -> str:
    """The path of ``tool``; skip without it, but fail under CI (.ci/run installs it)."""
    found = shutil.which(tool)
    if not found:
        if CI:
            pytest.fail(
                f"{tool} not found: {hint} (CI is set: the native tests must run there)", pytrace=False
            )
        pytest.skip(f"{tool} not found: {hint}")
    return found


def package(model: torch.nn.Module, example: torch.Tensor, path: Path, inputs: str, outputs: str) -> Path:
    """An AOTInductor package with caldera's metadata (what `caldera export` writes), dynamic batch."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    meta = {
        "caldera.inputs": inputs,
        "caldera.outputs": outputs,
        "caldera.device": "cpu",
        "caldera.format": "1",
    }
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"aot_inductor.metadata": meta}
    )
    return path


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Build native/ (library, Fortran module, test drivers, examples) and make the packages it runs."""
    need("cmake", "apt-get install cmake")
    need("c++", "apt-get install g++")
    need("gfortran", "apt-get install gfortran")
    work = tmp_path_factory.mktemp("native")
    build = work / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(ROOT / "native"), "-B", str(build), *generator,
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]  # fmt: skip
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    torch.manual_seed(0)
    mlp = MLP([8, 64, 64, 4]).eval()
    # The U-Net comes the way a user's does: a (short) training run, then `caldera export`; the native side loads
    # the export directory, so the metadata contract between the two is what is tested.
    run = tiny_run(work / "run", model={"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1,
                                                                         "channels": 8}})  # fmt: skip
    # Compiled for one thread per call (--threads 1, what a rank owning one core uses): the package inductor makes
    # then differs most from the default one, and must still match eager.
    exported = export(run, ["pt2"], out=run / "export", threads=1)
    assert exported.code == 0, exported.checks
    card = json.loads((run / "export" / "model.json").read_text())
    assert card["artefacts"]["aoti"]["threads_per_call"] == 1, card["artefacts"]
    unet = load_run_model(RunDir(run), load_run_config(run)).eval()
    models = {
        "mlp": (mlp, package(mlp, torch.randn(2, 8), work / "mlp.pt2", "x:float32:-1,8", "y:float32:-1,4")),
        "unet": (unet, run / "export"),
    }
    script = work / "mlp.ts"
    torch.jit.trace(mlp, torch.randn(2, 8)).save(str(script))
    return {"build": build, "work": work, "models": models, "script": script}


def run_driver(exe: Path, model: Path, x: np.ndarray, y_shape: tuple, work: Path, device: str = "cpu"):
    """Run a test driver on ``x``; return (CompletedProcess, output array or None)."""
    xf, yf = work / f"x_{exe.name}.bin", work / f"y_{exe.name}.bin"
    yf.unlink(missing_ok=True)
    x.astype(np.float32).tofile(xf)
    shape = ",".join(map(str, x.shape))
    args = [str(exe), str(model), device, str(xf), shape, str(yf), ",".join(map(str, y_shape))]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    y = np.fromfile(yf, dtype=np.float32).reshape(y_shape) if yf.exists() else None
    return proc, y


def test_cpp_and_fortran_callers_match_python_eager_and_survive_bad_calls(native):
    rng = np.random.default_rng(0)
    cases = [("mlp", (1, 8)), ("mlp", (37, 8)), ("unet", (1, 2, 16, 16)), ("unet", (3, 2, 16, 16))]
    for name, shape in cases:
        module, path = native["models"][name]
        x = rng.normal(size=shape).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        for exe in ("caldera_check_cpp", "caldera_check_f90"):
            proc, y = run_driver(native["build"] / exe, path, x, expected.shape, native["work"])
            out = proc.stdout
            assert proc.returncode == 0 and out.strip().endswith("ok"), (exe, out, proc.stderr)
            # Each failure is a status and one line naming the problem; the driver then goes on to the real run.
            assert re.search(
                r"^error path 2 no such file or directory: /nonexistent/export_dir$", out, re.M
            ), out
            assert re.search(
                r"^error shape 3 input 0 'x' has C shape \(.*\) but the model expects", out, re.M
            ), out
            assert re.search(
                r"^error dtype 4 input 0 'x' is float64 but the model takes float32", out, re.M
            ), out
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5, err_msg=f"{exe} {name} {shape}")
            assert exe.endswith("f90") or "error c-path 2 no such file" in out, out  # the C API called from C
            # The package metadata: what export recorded (the tiny run's data.args.steps = 10), a missing key is a
            # status and one line; from C++, a buffer too small says the length it needs.
            assert re.search(r"^metadata caldera.format 0 1$", out, re.M), out
            if name == "unet":
                assert re.search(r"^metadata caldera.data.steps 0 10$", out, re.M), out
            else:  # the test's own package records no data
                assert "error metadata 1 no metadata 'caldera.data.steps' in this model (re-export" in out, (
                    out
                )
            assert exe.endswith("f90") or re.search(r"^metadata size 1 1$", out, re.M), out

    # TorchScript (libtorch eager) through the same C API: no recorded shapes, the outputs still match.
    module, _ = native["models"]["mlp"]
    x = rng.normal(size=(4, 8)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    proc, y = run_driver(
        native["build"] / "caldera_check_cpp", native["script"], x, expected.shape, native["work"]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert (
        "error metadata 1 no metadata 'caldera.format' in this model (TorchScript files carry none"
        in proc.stdout
    )


def test_the_timing_programs_print_one_json_line_each(native):
    _, path = native["models"]["mlp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for exe in ("caldera_bench", "caldera_bench_f90"):
        proc = subprocess.run([str(native["build"] / exe), str(path), "1", "300"], capture_output=True, text=True,
                              timeout=120, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["batch"] == 1 and 0 < row["caldera_us"]["p50"] <= row["caldera_us"]["p99"], row
    assert 0 < row["caldera_us"]["p50"] < 1e4


def test_the_cpp_heat_example_reports_a_residual_and_both_timings(native):
    _, path = native["models"]["unet"]
    exe = str(native["build"] / "heat_surrogate_cpp")
    proc = subprocess.run([exe, str(path), "3", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The span comes from the export (the tiny run's data.args.steps), so physics and surrogate cover the same one.
    assert "window: 10 explicit steps (from the package's caldera.data.steps)" in proc.stdout, proc.stdout
    residuals = [float(r) for r in re.findall(r"residual (\S+) \(relative L2\)", proc.stdout)]
    assert len(residuals) == 2 and all(math.isfinite(r) and r > 0 for r in residuals), proc.stdout
    assert re.search(r"total: physics [\d.]+ ms, surrogate [\d.]+ ms for 3 plates of 16x16, 2 windows of 10 steps",
                     proc.stdout)  # fmt: skip
    assert re.search(r"^fastest window: physics [\d.]+ ms, surrogate [\d.]+ ms; surrogate / physics time: [\d.]+ "
                     r"\(cross-over at about \d+ steps", proc.stdout, re.M)  # fmt: skip
    # A span given on the command line wins, and one the surrogate was not trained for is said to be so.
    proc = subprocess.run([exe, str(path), "1", "1", "12"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning: the surrogate was trained for 10 steps, not 12" in proc.stdout, proc.stdout
    assert "window: 12 explicit steps (from the command line)" in proc.stdout, proc.stdout


@pytest.mark.mpi
def test_the_fortran_heat_example_runs_on_two_mpi_ranks(native):
    if not Path(SYSTEM_MPIEXEC).exists():
        hint = "apt-get install openmpi-bin libopenmpi-dev (the Fortran example needs the Debian Open MPI)"
        if CI:
            pytest.fail(f"{SYSTEM_MPIEXEC} not found: {hint}", pytrace=False)
        pytest.skip(hint)
    exe = native["build"] / "heat_surrogate_f90"
    assert exe.exists(), "CMake found no MPI Fortran: install libopenmpi-dev"
    _, path = native["models"]["unet"]
    cmd = [SYSTEM_MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "2", str(exe), str(path), "2", "2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "window: 10 explicit steps (from the package's caldera.data.steps)" in proc.stdout, proc.stdout
    for rank in (0, 1):
        found = re.findall(rf"^window \d+ rank {rank}: residual\s+(\S+)$", proc.stdout, re.M)
        assert len(found) == 2 and all(math.isfinite(float(r)) and float(r) > 0 for r in found), proc.stdout
    assert re.search(
        r"physics\s+[\d.]+ ms, surrogate\s+[\d.]+ ms for 2 plates of 16x16 per rank on 2 ranks, 2 windows of 10 "
        r"steps",
        proc.stdout,
    )
    assert re.search(
        r"^fastest window \(slowest rank\): physics\s+[\d.]+ ms, surrogate\s+[\d.]+ ms; surrogate / physics time:"
        r"\s+[\d.]+ \(cross-over at about \d+ steps",
        proc.stdout,
        re.M,
    )
    assert re.search(r"^CPU time per window \(slowest rank\): physics\s+[\d.]+ ms, surrogate\s+[\d.]+ ms;", proc.stdout,
                     re.M)  # fmt: skip


def test_devices_cuda_on_a_cpu_build_is_an_error_and_cuda_runs_where_present(native):
    mlp, path = native["models"]["mlp"]
    x = np.ones((2, 8), np.float32)
    proc, _ = run_driver(
        native["build"] / "caldera_check_cpp", path, x, (2, 4), native["work"], device="cuda"
    )
    if not torch.cuda.is_available():
        # Not an abort: a status and one line saying what to do.
        assert (
            proc.returncode == 1
            and "failed 5 device 'cuda' asked but this libtorch sees no CUDA" in proc.stdout
        )
        pytest.skip("no CUDA device: the CUDA path itself runs only where torch.cuda.is_available()")
    # A CPU package asked to run on CUDA is refused; a CUDA package runs on device and matches eager.
    assert proc.returncode == 1 and "was compiled for cpu but device cuda:0 was asked" in proc.stdout, (
        proc.stdout
    )
    cuda_mlp = MLP([8, 64, 64, 4]).eval().cuda()
    cuda_mlp.load_state_dict(mlp.state_dict())
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(cuda_mlp, (torch.randn(2, 8, device="cuda"),), dynamic_shapes=({0: batch},))
    meta = {"caldera.inputs": "x:float32:-1,8", "caldera.outputs": "y:float32:-1,4", "caldera.device": "cuda"}
    cuda_path = native["work"] / "mlp-cuda.pt2"
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(cuda_path), inductor_configs={"aot_inductor.metadata": meta}
    )
    proc, y = run_driver(
        native["build"] / "caldera_check_cpp", cuda_path, x, (2, 4), native["work"], device="cuda"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with torch.no_grad():
        np.testing.assert_allclose(y, mlp(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_the_c_api_loads_a_registry_model_by_name(native, tmp_path, monkeypatch):
    # A registry version holding the fixture's export (what `caldera publish --format pt2` puts there), committed by
    # the registry's own code; the C API finds it as NAME@N, NAME@latest and NAME@TAG through $CALDERA_REGISTRY.
    # (Imported here so that this test stays one hunk at the end of a file others edit.)
    from caldera.registry import Registry, write_manifest

    registry = Registry(tmp_path / "reg")
    module, export_dir = native["models"]["unet"]
    staged = registry.staging("unet")
    shutil.copytree(export_dir, staged, dirs_exist_ok=True)
    write_manifest(staged)
    registry.tag("unet", "prod", registry.commit("unet", staged).number)
    monkeypatch.setenv("CALDERA_REGISTRY", str(registry.root))
    x = np.random.default_rng(1).normal(size=(2, 2, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    for ref in ("unet@1", "unet@latest", "unet@prod"):
        proc, y = run_driver(
            native["build"] / "caldera_check_cpp", Path(ref), x, expected.shape, native["work"]
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5, err_msg=ref)
    proc, _ = run_driver(
        native["build"] / "caldera_check_cpp", Path("unet@7"), x, expected.shape, native["work"]
    )
    assert proc.returncode == 1 and "unet has no version '7'" in proc.stdout, proc.stdout
