"""The scaling model (benchmarks/scaling_model.py), offline: its fit against the measurements stored beside it, and
the limiting cases its formulas must keep."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from dataclasses import replace

import pytest

from tests.conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("scaling_model", ROOT / "benchmarks" / "scaling_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


sm = _module()


def test_the_fit_reproduces_the_measurements_and_the_limits_hold():
    data = json.loads(sm.DATA.read_text())
    machines = sm.fitted(data)
    rows = sm.checks(data, machines)
    fit = [abs(sm.error(r)) for r in rows if r["fit"]]
    # The 2-party all-reduces the constants were fitted to, within the error the docs state.
    assert statistics.median(fit) <= sm.FIT_ERROR_MEDIAN, statistics.median(fit)
    assert max(fit) <= sm.FIT_ERROR_MAX, max(fit)
    # Every measured layout and the MLP runs are checked, not only the fitted ones.
    assert {r["layout"] for r in rows} >= {"1x2", "2x1", "2x2", "4x1"}
    assert any(r["what"].startswith("MLP") for r in rows)

    job = sm.RESNET50
    one = sm.cluster(machines, job, "IB HDR 200 Gbit/s", 1)
    # One rank: no communication at all.
    assert sm.step_time(job, one, 1) == job.step_s and sm.efficiency(job, one, 1) == 1.0
    # One node of 4 ranks: the network never enters, whatever it costs.
    node = replace(one, per_node=4)
    for knobs in (sm.DEFAULT, sm.Knobs(hierarchical=False), sm.Knobs(wire="bf16")):
        dead = replace(node, inter=sm.Link(alpha=1.0, beta=1.0))
        assert sm.step_time(job, node, 1, knobs) == sm.step_time(job, dead, 1, knobs)

    # The bf16 wire halves the bytes term: with alpha, gamma and the casts at zero, half the network time.
    only_beta = sm.Machine("beta only", sm.Link(0.0, 1e-9), sm.Link(0.0, 1e-9), 0.0, 0.0, 0.0, 0.0)
    for per_node, hierarchical in ((1, False), (4, True)):
        m = replace(only_beta, per_node=per_node)
        for nodes in (2, 16, 1024):
            fp32, _ = sm.bucket_cost(1e8, nodes, m, sm.Knobs(hierarchical=hierarchical))
            bf16, _ = sm.bucket_cost(1e8, nodes, m, sm.Knobs(hierarchical=hierarchical, wire="bf16"))
            assert bf16 == pytest.approx(fp32 / 2), (per_node, nodes)

    # Overlap never makes a step slower; more nodes never make the default faster.
    for n in (2, 64, 1024):
        m = sm.cluster(machines, job, "IB EDR 100 Gbit/s", 4)
        assert sm.step_time(job, m, n, replace(sm.DEFAULT, overlap=True)) <= sm.step_time(job, m, n)
    effs = [sm.efficiency(job, m, n) for n in sm.NODES]
    assert effs == sorted(effs, reverse=True)

    # The advice reaches 90 % and nothing with fewer changes does.
    for job in [*sm.heat_unet(data), sm.RESNET50]:
        m = sm.cluster(machines, job, "IB HDR 200 Gbit/s", 4)
        knobs, eff, _ = sm.advise(job, m, 256)
        assert eff == sm.efficiency(job, m, 256, knobs) >= 0.9
        fewer = [k for k in sm.knob_grid() if len(sm.changes(k)) < len(sm.changes(knobs))]
        assert all(sm.efficiency(job, m, 256, k) < 0.9 for k in fewer)
