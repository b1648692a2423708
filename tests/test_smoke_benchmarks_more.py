"""The other half of the benchmarks' smoke runs (tests/test_smoke_benchmarks.py says why they are split)."""

from __future__ import annotations

import pytest

from tests.test_smoke_benchmarks import BENCHMARKS, IN_SECOND_FILE, params, run_smoke


@pytest.mark.parametrize("name", params([n for n in BENCHMARKS if n in IN_SECOND_FILE]))
def test_benchmark_runs_in_smoke_mode(name, tmp_path):
    run_smoke(name, tmp_path)
