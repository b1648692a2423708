"""Every registered strategy (and a toy one defined in one file) through the same checks on 2 real ranks.

One mpiexec job runs them all (each start costs seconds); the test is parametrised over ``available_strategies()``
so that a newly registered strategy is checked without touching this file. See tests/scripts/strategy_conformance.py
for what each check does; a strategy that refuses 2 ranks (async-shared: one process, its own workers) is checked
on one process here instead.
"""

import importlib.util
import json

import pytest

from caldera.comm.local import LocalComm
from caldera.parallel import available_strategies
from caldera.world import World
from tests.conftest import ROOT, run_ranks

SCRIPT = ROOT / "tests/scripts/strategy_conformance.py"
TOY = "toy-sum-average"  # tests/scripts/toy_strategy.py: a whole strategy in one file
NAMES = [*available_strategies(), "allreduce+zero", "allreduce+zero2", TOY]
INDEPENDENT = {"single"}  # on several ranks each trains its own copy: no equality with one process claimed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every strategy in one 2-rank job; return each one's measurements by name."""
    proc = run_ranks(2, [str(SCRIPT), str(tmp_path_factory.mktemp("conformance")), *NAMES], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"name"')]
    return {r.pop("name"): r for r in lines}


@pytest.mark.mpi
@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_sets_up_steps_round_trips_its_state_and_closes(name, results, tmp_path):
    out = results[name]
    if "refused" in out:  # this strategy runs on one process only: the same checks there
        spec = importlib.util.spec_from_file_location("strategy_conformance", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = module.check(name, World(comm=LocalComm()), str(tmp_path))
        assert "refused" not in out, out
    assert out["finite"], out
    if "epochs" in out:  # a loop strategy: a checkpointed fit, then a fresh instance resumed from it
        assert out["epochs"] == [1, 2] and out["resumed"], out
        assert out["single_diff"] < 1e-6, out  # synchronous settings: the same SGD as one process
        return
    assert out["moved"] > 1e-3, out  # it trained
    # The checkpoint state loaded into a fresh instance (other initial weights) takes exactly the same next step.
    assert out["roundtrip_diff"] == 0.0, out
    if name not in INDEPENDENT:
        assert out["spread"] == 0.0, out  # every rank holds the same model
        assert out["single_diff"] < 1e-6 and out["val_diff"] < 1e-6, out  # = one process on the global batch
