"""Sharded checkpoints of a ZeRO-1 optimizer state: each rank writes its own shard, a resume re-shards it onto any
number of ranks, sharded or not, and a missing shard file makes the checkpoint unusable."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from caldera.comm.local import LocalComm
from caldera.world import World
from tests.conftest import ROOT, run_ranks

SCRIPT = ROOT / "tests" / "scripts" / "sharded_checkpoint.py"


def _script():
    spec = importlib.util.spec_from_file_location("sharded_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layout(checkpoint):
    return json.loads((checkpoint / "manifest.json").read_text()).get("sharded")


def _flip_a_shard_byte(file):
    """Flip one byte inside the first optimizer-shard tensor's bytes of a rank file, as a failing disk would."""
    shard = torch.load(file, weights_only=True)["sharded"]["vectors"]["exp_avg"][0]
    raw = bytearray(file.read_bytes())
    at = raw.find(shard.numpy().tobytes())
    assert at > 0
    raw[at + 1] ^= 0x40
    file.write_bytes(bytes(raw))


def _ranks(n, *runs):
    proc = run_ranks(n, [str(SCRIPT), *(str(a) for run in runs for a in run)])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.mpi
def test_sharded_checkpoints_resume_on_any_rank_count_and_strategy(tmp_path):
    fit = _script().fit
    alone = World(comm=LocalComm())
    # 2 ranks, the optimizer state sharded: an unbroken run of 12 steps, checkpointing every 3 in the background.
    _ranks(2, (tmp_path / "unbroken.pt", tmp_path / "two", "-", 1, 2))
    unbroken = torch.load(tmp_path / "unbroken.pt")
    mid = tmp_path / "two" / "step-000000006"  # mid-epoch (4 steps an epoch)

    # Rank 0 wrote the model and the layout, no optimizer state; each rank file holds its own range only.
    layout = _layout(mid)
    assert layout["size"] == 2 and layout["files"] == ["rank-00000.pt", "rank-00001.pt"]
    chunk, total = layout["chunk"], layout["total"]
    assert layout["dtype"] == "float32" and layout["ranges"] == [[0, chunk], [chunk, total]]
    # Every parameter, by its index in the optimizer's state_dict (the flat layout aligns them: total >= numel).
    assert sorted(p["index"] for p in layout["params"]) == list(range(6))
    assert sum(torch.Size(p["shape"]).numel() for p in layout["params"]) == unbroken.numel() <= total
    shared = torch.load(mid / "shared.pt", weights_only=True)
    assert shared["optimizer"]["state"] == {} and shared["sharded_layout"] == layout
    for r, (lo, hi) in enumerate(layout["ranges"]):
        part = torch.load(mid / f"rank-{r:05d}.pt", weights_only=True)["sharded"]
        assert part["shard"] == r and set(part["vectors"]) == {"exp_avg", "exp_avg_sq"}
        # One piece per parameter the range covers (alignment gaps between parameters hold none).
        covered = sum(max(0, min(hi, p["offset"] + torch.Size(p["shape"]).numel()) - max(lo, p["offset"]))
                      for p in layout["params"])  # fmt: skip
        assert all(sum(piece.numel() for piece in v) == covered for v in part["vectors"].values())

    # One process, not sharded, from the 2-rank sharded checkpoint (its own checkpoints are plain).
    one, _ = fit(alone, tmp_path / "one", mid, False)
    assert (one - unbroken).abs().max() < 1e-5  # another rank count sums the gradients in another order
    assert _layout(tmp_path / "one" / "step-000000009") is None

    # A deleted shard file makes the newest checkpoint unusable, a damaged one the one before: the resume falls
    # back to the one before them.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "two", broken)
    (broken / "step-000000012" / "rank-00001.pt").unlink()
    _flip_a_shard_byte(broken / "step-000000009" / "rank-00000.pt")
    with pytest.warns(UserWarning) as warned:
        again, trainer = fit(alone, broken, True, False)
    said = " ".join(str(w.message) for w in warned)
    assert "step-000000012 is unusable (rank-00001.pt is missing)" in said
    assert "step-000000009 is unusable (rank-00000.pt fails its checksum" in said
    assert trainer.resumed_from.name == "step-000000006"
    assert (again - unbroken).abs().max() < 1e-5

    # 2 -> 3 ranks (sharded: its checkpoints are cut in 3); then, on 2 of the 3 ranks, 3 -> 2 and plain (one
    # process) -> sharded.
    _ranks(3, (tmp_path / "three.pt", tmp_path / "three", mid, 1, 3),
           (tmp_path / "back.pt", tmp_path / "back", tmp_path / "three" / "step-000000009", 1, 2),
           (tmp_path / "plain.pt", tmp_path / "plain", tmp_path / "one" / "step-000000009", 1, 2))  # fmt: skip
    assert _layout(tmp_path / "three" / "step-000000009")["size"] == 3
    assert _layout(tmp_path / "back" / "step-000000012")["size"] == 2
    for name in ("three", "back", "plain"):
        assert (torch.load(tmp_path / f"{name}.pt") - unbroken).abs().max() < 1e-5, name
