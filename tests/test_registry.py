"""The model registry: publish a real trained run, read it back through the CLI and by name, many publishers at
once, a publisher killed mid-publish, tampered files refused."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from caldera.cli import main
from caldera.coupling import Surrogate
from caldera.predict import predict
from caldera.registry import MANIFEST, REMOVED, STAGING, Registry, write_manifest
from caldera.registry.publish import publish
from caldera.serve import Ensemble, make_server, model_version
from tests.conftest import ROOT, tiny_run

pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny trained run published twice (v1 tagged prod) into a fresh registry."""
    base = tmp_path_factory.mktemp("registry")
    run = tiny_run(base / "heat")
    reg = base / "reg"
    first, digest = publish(run, tags=["prod"], registry=reg, echo=False)
    assert (first.ref, len(digest)) == ("heat@1", 64)
    second, _ = publish(run, registry=reg, echo=False)
    assert second.ref == "heat@2"
    return run, reg


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_show_diff_rm_and_one_line_errors(published, tmp_path, capsys, monkeypatch):
    run, reg0 = published
    reg = tmp_path / "reg"
    shutil.copytree(reg0, reg)  # this test removes versions: a copy, the other tests keep theirs
    monkeypatch.setenv("CALDERA_REGISTRY", str(reg))

    code, out, _ = cli(capsys, "models", "list")
    assert code == 0 and "heat@1" in out and "heat@2" in out
    assert "prod" in out.splitlines()[1] and "latest" in out.splitlines()[2]

    code, out, _ = cli(capsys, "models", "show", "heat@prod")
    assert code == 0 and out.startswith("# heat")
    for text in (
        "unet_small",
        "val_loss",
        "data fingerprint",
        "published_by",
        "torch",
        "heat@1",
        "match the MANIFEST",
    ):
        assert text in out, text
    version = Registry(reg).get("heat@1")
    card = json.loads((version.path / "model.json").read_text())
    assert card["artefacts"]["safetensors"]["verification"]["ok"]
    assert {"config.resolved.json", "model.pt", "model.safetensors", "README.md", "provenance.json"} <= set(
        version.manifest()
    )

    code, out, _ = cli(capsys, "models", "diff", "heat@1", "heat@latest")
    assert (
        code == 0
        and "config: identical" in out
        and "data fingerprint: same" in out
        and "weights: same" in out
    )

    # Errors: one line each, exit 2, naming the fix.
    for args, expect in [
        (("models", "show", "nope@1"), "no model 'nope'"),
        (("models", "show", "heat@7"), "no version '7'"),
        (("models", "show", "heat@staging"), "no version 'staging'"),
        (("models", "diff", "heat@1"), "two versions"),
        (("publish", str(run), "--tag", "latest", "--registry", str(reg)), "tag 'latest'"),
        (("publish", str(tmp_path), "--registry", str(reg)), "no config.resolved.json"),
    ]:
        code, _, err = cli(capsys, *args)
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, (args, err)
    monkeypatch.delenv("CALDERA_REGISTRY")
    code, _, err = cli(capsys, "models", "list")
    assert code == 2 and "CALDERA_REGISTRY" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "predict", "heat@1")
    assert code == 2 and "heat@1 names a registry model" in err
    monkeypatch.setenv("CALDERA_REGISTRY", str(reg))

    # A tampered file is refused on load, naming the file.
    weights = Registry(reg).get("heat@2").path / "model.pt"
    os.chmod(weights.parent, 0o755)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    code, _, err = cli(capsys, "predict", "heat@latest")
    assert code == 2 and "model.pt does not match its MANIFEST" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(Exception, match="model.pt does not match"):
        Surrogate.from_run("heat@2")

    # rm: the version disappears whole, its tags go with it, its number is never reused.
    code, out, _ = cli(capsys, "models", "rm", "heat@1")
    assert code == 0 and "removed tags prod" in out
    assert [p.name for p in (reg / "heat" / "v1").iterdir()] == [REMOVED]
    assert not (reg / "heat" / "tags" / "prod").exists()
    code, _, err = cli(capsys, "models", "show", "heat@1")
    assert code == 2 and "was removed" in err
    code, _, err = cli(capsys, "models", "show", "heat@prod")
    assert code == 2
    code, _, _ = cli(capsys, "models", "rm", "heat@2")
    assert code == 0
    code, out, _ = cli(capsys, "models", "list")
    assert code == 0 and "no models" in out
    staged = Registry(reg).staging("heat")
    (staged / "x.txt").write_text("x")
    write_manifest(staged)
    assert Registry(reg).commit("heat", staged).number == 3


def test_predict_and_surrogate_by_name_equal_the_run_directory(published, tmp_path, monkeypatch):
    run, reg = published
    monkeypatch.setenv("CALDERA_REGISTRY", str(reg))
    by_dir = predict(run, out=tmp_path / "dir.npy", progress=False)
    by_name = predict("heat@prod", out=tmp_path / "name.npy", progress=False)
    assert by_dir == by_name
    np.testing.assert_array_equal(np.load(tmp_path / "dir.npy"), np.load(tmp_path / "name.npy"))

    x = np.random.default_rng(0).standard_normal((3, 2, 16, 16)).astype(np.float32)
    direct, named = Surrogate.from_run(run, device="cpu"), Surrogate.from_run("heat@latest", device="cpu")
    np.testing.assert_array_equal(direct(x), named(x))
    mean, std = Ensemble.from_runs(["heat@1", "heat@2"], device="cpu")(x)  # serve's Python API
    np.testing.assert_allclose(mean, direct(x), rtol=1e-6)
    with torch.no_grad():
        assert np.abs(std).max() < 1e-6  # the same weights twice

    # Served by name: the OIP v2 metadata comes from the version's card (names and every size), the version is the
    # number NAME@latest resolved to, and a request of the wrong shape is a 400 naming both shapes.
    server = make_server({"heat": Ensemble.from_runs(["heat@latest"], device="cpu")}, port=0,
                         versions={"heat": model_version("heat@latest")})  # fmt: skip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/models/heat"
        meta = json.load(urllib.request.urlopen(url, timeout=30))
        assert meta["versions"] == ["2"], meta
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2, 16, 16]}], meta
        assert meta["outputs"][0]["name"] == "y" and meta["outputs"][0]["shape"] == [-1, 1, 16, 16], meta
        body = {"inputs": [{"name": "x", "shape": [1, 2, 8, 8], "datatype": "FP32", "data": [0.0] * 128}]}
        request = urllib.request.Request(url + "/infer", json.dumps(body).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert (
            err.value.code == 400 and "does not fit the model's [-1, 2, 16, 16]" in err.value.read().decode()
        )
        body["inputs"][0].update(shape=[1, 2, 16, 16], data=x[0].ravel().tolist())
        request = urllib.request.Request(url + "/infer", json.dumps(body).encode(), method="POST")
        reply = json.load(urllib.request.urlopen(request, timeout=30))
        np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], (1, 1, 16, 16)), direct(x[:1]), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()


def _publisher(reg: str, i: int, start, out) -> None:
    """One of N processes publishing at once: stage a distinct version (a copy of heat@1 plus its own marker)."""
    registry = Registry(reg)
    staged = registry.staging("crowd")
    shutil.copytree(registry.get("heat@1", verify=False).path, staged, dirs_exist_ok=True)
    (staged / MANIFEST).unlink()
    (staged / "publisher.txt").write_text(str(i))
    write_manifest(staged)
    start.wait()  # every publisher commits at the same moment
    out.put((i, registry.commit("crowd", staged).number))


def test_concurrent_publishers_get_distinct_whole_versions_and_a_killed_one_leaves_nothing(
    published, tmp_path
):
    run, reg0 = published
    reg = tmp_path / "reg"
    shutil.copytree(reg0, reg)
    for p in (reg / "heat").rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    ctx = multiprocessing.get_context("fork")  # real processes, started at once (no fresh interpreter each)
    n, start, out = 6, ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(str(reg), i, start, out)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = dict(out.get(timeout=5) for _ in range(n))
    assert sorted(got.values()) == list(range(1, n + 1))
    registry = Registry(reg)
    for i, number in got.items():
        version = registry.get(f"crowd@{number}")  # verifies every file against its manifest
        assert (version.path / "publisher.txt").read_text() == str(i)

    # A real `caldera publish` killed with SIGKILL mid-export (safetensors written, ONNX under way): nothing
    # visible, and the next publish cleans its staging directory.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "caldera.cli", "publish", str(run), "--name", "killed",
                             "--format", "onnx", "--registry", str(reg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not any((reg / STAGING).glob("killed@*/model.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert any((reg / STAGING).glob("killed@*/model.safetensors")), "the publisher never started staging"
    proc.wait()
    assert "killed" not in registry.names() and not (reg / "killed").exists()
    publish(run, name="after", registry=reg, echo=False)
    assert not any((reg / STAGING).iterdir()), "the killed publisher's staging directory was not cleaned"
    assert registry.names() == ["after", "crowd", "heat"]
