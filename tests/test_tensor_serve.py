"""Model-parallel inference: ``caldera predict --tp 2`` and ``caldera serve --tp 2`` on two real ranks, each holding
half of every split layer, equal the whole model in one process; the server survives bad requests and SIGTERM ends
every rank."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import caldera
from caldera.config import load_config
from caldera.errors import ConfigError
from caldera.parallel.tensor import plan_layers, split_params
from caldera.parallel_infer import ServingGroup, load_shard, split_group
from caldera.predict import load_run_config, predict
from caldera.train.run import build_model, load_run_model
from caldera.train.rundir import RunDir
from tests.conftest import ROOT, mpiexec


class Place:
    """A rank's place in a group, all that loading a shard reads of it."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


def post(port: int, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.mpi
def test_predict_and_serve_on_two_ranks_holding_half_the_model_equal_one_process_meta_built(tmp_path):
    run = tmp_path / "run"  # trained on the 2 ranks first (tp 2), its weights written shard-wise
    model = build_model(load_config(ROOT / "examples/digits_tensor.toml", values={"model.args.dim": 32}))
    whole = sum(p.numel() for p in model.parameters())
    split = sum(p.numel() for n, p in model.named_parameters()
                if any(k in n for k in ("attn.q", "attn.k", "attn.v", "mlp.up"))
                or (n.endswith("weight") and any(k in n for k in ("attn.out", "mlp.down"))))  # fmt: skip
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
           "tests/scripts/tensor_serve.py", str(run), str(tmp_path / "tp.npy")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        ranks, port = [], None
        for line in proc.stdout:
            if line.startswith("{"):
                ranks.append(json.loads(line))
            if line.startswith("caldera serve:") and "http://" in line:
                port = int(line.split("http://")[1].split()[0].rsplit(":", 1)[1])
                break
        assert port is not None, proc.stderr.read()[-3000:] if proc.poll() is not None else "no serve line"
        # Each rank holds half of every split layer: the whole model exists on neither.
        assert sorted(r["held"] for r in ranks) == [whole - split // 2] * 2, (ranks, whole, split)
        # Built on the meta device, materialised a module at a time and cut at once: the ordinary initial slices.
        assert [r["meta_diff"] for r in ranks] == [0.0, 0.0], ranks
        assert (run / "model-shards/tp-00001.pt").is_file() and not (run / "model.pt").exists()
        # predict --tp 2 (rank 0 reads and broadcasts each batch, writes the rows) = one process's predict, which
        # joins the shard-wise weights into the whole model (as caldera export and fine-tuning do).
        predict(run, out=tmp_path / "one.npy", progress=False)
        one, tp = np.load(tmp_path / "one.npy"), np.load(tmp_path / "tp.npy")
        assert one.shape == tp.shape == (359, 10) and np.abs(one - tp).max() < 1e-5
        reference = load_run_model(RunDir(run), load_run_config(run)).eval()
        x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
        with torch.no_grad():
            want = reference(torch.as_tensor(x)).numpy()
        status, out = post(port, json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200 and np.abs(np.asarray(out["outputs"]) - want).max() < 1e-5, (status, out)
        # Hostile clients get a 4xx naming the problem; the group keeps serving.
        status, out = post(port, b'{"inputs": [[1, 2')
        assert status == 400 and "send JSON" in out["error"], out
        status, out = post(port, json.dumps({"inputs": [[1.0] * 7]}).encode())  # 7 values: not 8-value tokens
        assert status == 400 and "could not take inputs of shape [1, 7]" in out["error"], out
        status, out = post(port, json.dumps({"inputs": x[:2].tolist()}).encode())
        assert status == 200 and np.abs(np.asarray(out["outputs"]) - want[:2]).max() < 1e-5, out
        # SIGTERM to every rank (what a scheduler sends): rank 0 drains, releases the other, all exit 0.
        for r in ranks:
            os.kill(r["pid"], signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "stopped after 2 requests in 2 forward passes" in rest, rest
        # The tp = 2 shard files read for another tp (4: joined one tensor at a time, cut anew; loading alone talks
        # to no other rank): every slice is the whole model's.
        cfg = load_run_config(run)
        whole_state = reference.state_dict()
        dims = split_params(plan_layers(reference, None, 4))
        for r in range(4):
            shard, _, strategy = load_shard(run, cfg, Place(r, 4))
            got = shard.state_dict()
            strategy.close()
            for k, v in whole_state.items():
                assert torch.equal(got[k], v.chunk(4, dims[k])[r] if k in dims else v), (r, k)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_model_parallel_inference_refuses_a_wrong_tp_in_one_line(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "examples/digits_tensor.toml", values={"run.dir": str(run)})
    RunDir(run).save_config(cfg)
    RunDir(run).save_weights(build_model(cfg))
    with pytest.raises(
        ConfigError, match=r"serve --tp 2: the model's shards need exactly 2 ranks, this job has 1"
    ):
        ServingGroup(run, 2, caldera.World())
    with pytest.raises(ConfigError, match=r"--tp 3 must divide the 4 ranks"):
        split_group(caldera.World(rank=1, size=4), 3)
    with pytest.raises(
        ConfigError,
        match=r"'blocks.0.attn.q' \(colwise\) has 32 output features, which tp = 3 does not divide",
    ):
        load_shard(run, load_run_config(run), Place(0, 3))
    with pytest.raises(ConfigError, match=r"model-parallel prediction takes one model"):
        predict([run, run], tp=1, progress=False)
