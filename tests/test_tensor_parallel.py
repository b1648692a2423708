"""Tensor parallelism: tp and tp x dp runs of a run file on real ranks equal one process; slices per rank; resume
onto another rank count; clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import caldera
from caldera.errors import ConfigError
from caldera.models import Transformer
from caldera.parallel.tensor import TensorParallel, plan_layers
from tests.conftest import run_ranks


@pytest.mark.mpi
def test_tp_and_tp_x_dp_train_the_run_file_like_one_process_holding_half_the_split_layers_and_resume_shard_wise(
    tmp_path,
):
    # One 4-rank job (tests/scripts/tensor_equivalence.py): ranks 0-1 train examples/digits_tensor.toml 2 epochs
    # with tp = 2; all 4 train epoch 1 as tp 2 x 2 replicas, whose checkpoint ranks 0-1 resume for epoch 2; rank 0
    # trains the same file with strategy 'single' for 1 and 2 epochs. SGD with momentum, fp32.
    proc = run_ranks(4, ["tests/scripts/tensor_equivalence.py", str(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["scale"] > 0.1, out  # the weights are not near zero: 1e-5 is a relative claim too
    assert out["tp2_diff"] < 1e-5, out  # 2 ranks, tp 2: model.pt = one process's after 12 steps
    assert out["tp2dp2_diff"] < 1e-5, out  # 4 ranks, 2 replicas x tp 2: = one process after epoch 1
    assert out["resumed_epochs"] == [1, 2] and out["resumed_diff"] < 1e-5, out  # 4 ranks' checkpoint, 2 go on
    # While training each rank holds half of every split layer (and of its momentum), the rest whole.
    assert out["held"] == [[out["whole"] - out["split"] // 2]] * 2, out
    assert out["up"] == [[[32, 16, 32, 16]]] * 2, out  # mlp.up: 64 x 16 whole, rows cut in two
    # One block: one all-reduce forward and one backward per attention and per MLP (q, k, v share theirs).
    assert out["sums"] == [[4]] * 2, out
    assert out["saved_whole"] == out["whole"], out  # the shard-wise weights join into the whole, plain model
    # Shard-wise: each rank of the group wrote its half of every split layer (and of its momentum); nothing gathered.
    assert out["ckpt_kind"] == "tensor" and out["ckpt_files"] == ["rank-00000.pt", "rank-00001.pt"], out
    assert out["ckpt_up"] == out["shared_up"] == [32, 16], (
        out
    )  # rank 0's shared.pt holds no whole split layer
    assert out["shards_written"] == ["layout.json", "shared.pt", "tp-00000.pt", "tp-00001.pt"], out
    assert not out["model_pt"], out
    # The 4 ranks' checkpoint resumed in one process (the shards joined) = one process's unbroken run.
    assert out["one_epochs"] == [1, 2] and out["one_diff"] < 1e-5, out


def test_a_plan_is_checked_against_the_model_and_the_ranks_in_one_line():
    model = Transformer(in_features=8, dim=12, heads=3, layers=1, mlp_ratio=2)
    names = [n for n, _, _ in plan_layers(model, None, 3)]  # the default plan: the transformer's blocks
    assert names == [
        f"blocks.0.{n}" for n in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.down")
    ]
    with pytest.raises(
        ConfigError, match=r"'blocks.0.attn' has 3 attention heads, which tp = 2 does not divide"
    ):
        plan_layers(model, None, 2)
    with pytest.raises(
        ConfigError, match=r"plan: 'blocks.0.mlp.up' \(colwise\) has 24 output features, which tp = 5"
    ):
        plan_layers(model, {"*mlp.up": "colwise"}, 5)
    with pytest.raises(
        ConfigError, match=r"plan: 'fc' names no module of Transformer \(its Linear layers: embed,"
    ):
        plan_layers(model, {"fc": "colwise"}, 2)
    with pytest.raises(ConfigError, match=r"plan: 'blocks.0.attn' is a Attention, not an nn.Linear"):
        plan_layers(model, {"blocks.0.attn": "rowwise"}, 3)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(
        ConfigError, match=r"the default plan .* names no module of Sequential; give \[parallel\] plan"
    ):
        plan_layers(mlp, None, 2)
    with pytest.raises(ConfigError, match=r"tp = 3 must divide the 4 ranks \(ranks = replicas x tp\)"):
        TensorParallel(tp=3).data_shards(caldera.World(rank=0, size=4))
    assert TensorParallel(tp=2).data_shards(caldera.World(rank=3, size=4)) == (1, 2)  # replica 1 of 2


def test_the_run_file_refuses_a_plan_of_other_kinds_and_bf16_true(tmp_path):
    from caldera.config import load_config

    with pytest.raises(ConfigError, match="plan"):
        load_config("examples/digits_tensor.toml", values={"parallel.plan": {"*mlp.up": "diagonal"}})
    with pytest.raises(ConfigError, match="bf16-true"):
        load_config("examples/digits_tensor.toml", values={"precision.mode": "bf16-true"})
    torch.manual_seed(0)  # one process: the strategy is plain training, the model unchanged
    model = Transformer(in_features=8, dim=8, heads=2, layers=1)
    strategy = TensorParallel()
    assert strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), caldera.World()) is model
    assert strategy.split == {} and model(torch.randn(2, 64)).shape == (2, 10)
