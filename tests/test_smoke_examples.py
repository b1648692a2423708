"""Every example runs in its smoke mode (seconds), so no refactor leaves one broken.

Each example file states its smoke run on a line ``Smoke run (seconds...): COMMAND`` (scripts: ``--smoke``; run
files: ``caldera train X.toml --set ...``); these tests run exactly that command, from a scratch directory that sees
the examples, so the documented line is the tested one. A new example fails here until it has one (or a test that
runs it end to end is named in COVERED)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXAMPLES = sorted(p.name for p in (ROOT / "examples").iterdir() if p.suffix in (".py", ".toml"))
# Run end to end, with small sizes, by these tests already.
COVERED = {
    "heat_surrogate.toml": "tests/test_cli.py",
    "digits_async.toml": "tests/test_async_strategies.py (caldera train ... optim.epochs=1)",
    "digits_pipeline.toml": "tests/test_pipeline.py (2 ranks)",
    "digits_tensor.toml": "tests/test_tensor_parallel.py (2 and 4 ranks)",
    "ddp_from_mpi.py": "tests/test_launch.py::test_plain_ddp_under_mpiexec_gets_its_process_group_from_mpi_and_the_hang_watchdog",
    "digits_tune.toml": "tests/test_tune.py",
    "heat_online.py": "tests/test_coupling.py::test_the_online_example_stops_for_the_wall_time_and_resumes",
    "heat_coupled.py": "tests/test_coupling.py::test_the_coupled_example_improves_the_surrogate_inside_the_simulation",
}
# Examples that read what another one trained run after it, in one test (in this order).
CHAINS = {
    "climate": ["climate_forecast.toml", "climate_finetune.toml", "climate_rollout.py"],
    "bragg": ["bragg.toml", "bragg_eval.py"],
    "chirp": ["chirp.toml", "chirp_eval.py"],
    "imaging": ["imaging_denoise.toml", "imaging_denoise.py"],
    "imaging_gpu": ["imaging_denoise_gpu.toml"],
    "focus": ["focus.toml", "focus_eval.py"],
    "materials": ["materials_potential.toml", "materials_md.py"],
    "materials_active": ["materials_active.py"],
    "linalg": ["linalg_refinement.py"],
    "export": ["export_heat.py"],
    "heat_long": ["heat_surrogate_long.toml"],
}
SMOKE_LINE = re.compile(r"^[#\s]*Smoke run \(seconds[^)]*\):[ \t]*(?:\n#[ \t]*)?(.+)$", re.MULTILINE)


def smoke_command(name: str) -> list[str]:
    """The smoke command the example documents, with this Python for ``python`` and ``caldera``."""
    found = SMOKE_LINE.search((ROOT / "examples" / name).read_text())
    assert found, f"examples/{name} states no 'Smoke run (seconds): ...' line"
    words = shlex.split(found[1])
    head = {"python": [sys.executable], "caldera": [sys.executable, "-m", "caldera.cli"]}[words[0]]
    return head + words[1:]


def test_every_example_has_a_smoke_run_or_a_test_that_runs_it():
    chained = [n for chain in CHAINS.values() for n in chain]
    assert sorted(chained + list(COVERED)) == EXAMPLES, (
        "add the new example to CHAINS (with a smoke line) or COVERED"
    )
    for name in chained:
        assert "examples/" + name in " ".join(smoke_command(name))


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_example_runs_in_smoke_mode(chain, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}
    for name in CHAINS[chain]:
        proc = subprocess.run(smoke_command(name), capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=env)  # fmt: skip
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Each run wrote its results into its own run directory under the scratch directory, none into the checkout.
    runs = {p.name for p in (tmp_path / "runs").iterdir()} if (tmp_path / "runs").exists() else set()
    expected = {"climate": {"climate-forecast", "climate-finetune"}, "imaging": {"imaging-denoise"},
                "imaging_gpu": {"imaging-denoise-gpu"}, "focus": {"focus"},
                "materials": {"materials-potential"}, "materials_active": {"materials-active"}, "linalg": set(),
                "export": {"heat-surrogate"}, "heat_long": {"heat-surrogate-long"},
                "bragg": {"bragg"}, "chirp": {"chirp"}}  # fmt: skip
    assert runs == expected[chain], runs
    for run in runs:
        assert any((tmp_path / "runs" / run).glob("*.json")), sorted((tmp_path / "runs" / run).iterdir())
