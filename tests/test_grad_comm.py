"""Low-precision gradient communication (``[parallel] grad_comm``): 16 bits between ranks, fp32 sums, the same
bits on every rank, and within 16-bit rounding of one process with the global batch."""

import json

import pytest
import torch
from torch import nn

from caldera.comm.local import LocalComm
from caldera.comm.lowp import sum_rows_
from caldera.config import ConfigError, load_config
from caldera.parallel import make_strategy
from caldera.world import World
from tests.conftest import run_ranks

GOOD = {"model": {"name": "mlp", "args": {"sizes": [64, 10]}}, "data": {"source": "digits"}}
# REDUCER:GRAD_COMM[:CLIP[:scaled]], several per launch (starting the ranks is the slow part); "nodes" runs the
# shm reducer with every rank its own node, so every sum crosses between nodes.
CASES = {
    2: ["shm:bf16:0.05", "shm:fp16", "mpi:fp16::scaled", "nodes:fp16"],
    3: ["shm:bf16", "mpi:bf16", "nodes:bf16"],
}
WIRE = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_16_bit_gradient_sums_are_exact_fp32_sums_of_rounded_gradients(ranks):
    proc = run_ranks(ranks, ["tests/scripts/dp_grad_comm.py", *CASES[ranks]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(CASES[ranks]), proc.stdout[-3000:]
    for row in rows:
        reducer, grad_comm, clip, scaled = row["case"]
        if reducer == "nodes":  # the same sums as the mpi reducer's, and the same bits everywhere
            assert row["bit_equal"] and row["spread"] == 0.0, row
            continue
        assert row["size"] == ranks and row["reducer"] == reducer and row["steps"] == 5, row
        assert row["wire"] == WIRE[grad_comm], row  # what the ranks exchange is 16-bit: half the bytes
        assert row["spread"] == 0.0, row  # every rank holds bit-identical weights
        assert row["rounded"], row  # the optimizer was not given the exact fp32 sum
        if clip is None:  # (clipping rescales the sum, so there is nothing bit-exact to compare)
            assert row["bit_equal"], row  # = sum in fp32, in rank order, of each rank's rounded gradient
        # Rounding moves a value by at most 2^-8 (bf16) or 2^-11 (fp16) of itself, so five updates built from
        # rounded gradients stay within 1 % of the fp32 ones (measured: 0.1-0.2 % bf16, 0.01-0.02 % fp16); a sum
        # that misses a rank, a mean taken twice or an unscaled fp16 wire under a tiny loss is off by 20-65 %.
        assert row["rel_update_error"] < 1e-2, row
        if grad_comm == "fp16" and scaled:  # fp16-mixed: the loss scaler skips the overflowed step everywhere
            assert row["overflow"] == ["stepped"] * ranks and row["skipped"] == 1 and row["unchanged"], row
        elif grad_comm == "fp16":  # fp32 training: every rank stops with the cause and the fix
            assert all("grad_comm = 'fp16'" in o and "65504" in o for o in row["overflow"]), row
            assert row["unchanged"], row


def test_grad_comm_is_checked_in_the_run_file():
    cfg = load_config({**GOOD, "parallel": {"strategy": "allreduce", "grad_comm": "bf16"}})
    strategy = make_strategy(cfg.parallel.strategy, **cfg.parallel.model_dump(exclude={"strategy"}))
    assert strategy.grad_comm == "bf16" and strategy.wire == torch.bfloat16  # passed through like run.py does
    with pytest.raises(ConfigError) as err:
        load_config({**GOOD, "parallel": {"strategy": "allreduce", "grad_comm": "int8"}})
    assert "parallel.grad_comm" in str(err.value) and "'fp32', 'bf16' or 'fp16'" in str(err.value)
    with pytest.raises(
        ConfigError, match="grad_comm' = 'bf16': not an option of strategy 'local-sgd' .*'allreduce'"
    ):
        load_config({**GOOD, "parallel": {"strategy": "local-sgd", "grad_comm": "bf16"}})


def test_unknown_grad_comm_names_the_allowed_values():
    with pytest.raises(ValueError, match="unknown grad_comm 'fp8'; use one of 'fp32', 'bf16', 'fp16'"):
        make_strategy("allreduce", grad_comm="fp8")


def test_one_rank_accepts_grad_comm_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    strategy = make_strategy("allreduce", grad_comm="bf16")
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), World(comm=LocalComm()))
    strategy.backward(model(torch.randn(3, 4)).square().sum())
    assert strategy.reducer == "none" and model.weight.grad.dtype == torch.float32
    assert not torch.equal(model.weight.grad, model.weight.grad.bfloat16().float())  # never rounded
    strategy.step()
    strategy.close()


def test_rows_are_summed_in_fp32_in_order():
    rows = [torch.tensor([256.0, 1.0, -3.0]).bfloat16(), torch.tensor([1.0, 1 / 256, 3.0]).bfloat16()]
    out = sum_rows_(torch.empty(3), rows)
    assert out.tolist() == [257.0, 1 + 1 / 256, 0.0]  # 257 and 1 + 2^-8 are not bf16 numbers: fp32 kept them
