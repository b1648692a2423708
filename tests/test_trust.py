"""No code runs from a received run directory: import paths it names need --trust-code (docs/security.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from caldera.cli import main
from caldera.config import UntrustedCode, code_refs
from caldera.coupling.surrogate import Surrogate
from tests.conftest import ROOT

USER_MODELS = '''
import torch


def Net(width: int = 16):
    """A user's own model class, imported by path: digits' 8x8 images to 10 classes."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))
'''

RUN_FILE = """
[run]
dir = "{dir}"
[model]
name = "user_models:Net"
args = {{width = 8}}
[data]
source = "digits"
batch_size = 128
val_fraction = 0.2
[optim]
epochs = 1
lr = 0.01
[train]
loss = "cross_entropy"
metrics = ["accuracy"]
progress = false
plot = false
"""


def caldera(*args, cwd, env):
    """`caldera ...` in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "caldera.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)  # fmt: skip


def refused_in_one_line(proc, key, path, run_dir):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    line = lines[0]
    for part in (str(run_dir), key, path, "someone else", "runs its code", "--trust-code"):
        assert part in line, line


def test_a_run_directory_imports_code_only_when_the_user_trusts_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    # A real run with the user's own model class: a run file given to `caldera train` is the user's, trusted.
    run = tmp_path / "run"
    (tmp_path / "run.toml").write_text(RUN_FILE.format(dir=run))
    assert main(["train", str(tmp_path / "run.toml")]) == 0
    assert json.loads((run / "config.resolved.json").read_text())["model"]["name"] == "user_models:Net"

    # Someone hands over a copy whose model is os:system: predict and serve refuse before importing anything.
    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    marker = tmp_path / "PWNED"
    cfg = json.loads((evil / "config.resolved.json").read_text())
    cfg["model"] = {"name": "os:system", "args": {"command": f"touch {marker}"}}
    (evil / "config.resolved.json").write_text(json.dumps(cfg))
    refused_in_one_line(caldera("predict", str(evil), cwd=tmp_path, env=env), "model.name", "os:system", evil)
    refused_in_one_line(caldera("serve", str(evil), "--port", "0", cwd=tmp_path, env=env),
                        "model.name", "os:system", evil)  # fmt: skip
    with pytest.raises(UntrustedCode, match="model.name = 'os:system'"):
        Surrogate.from_run(evil)
    assert not marker.exists()

    # Every other key resolve() imports from is checked too, before the data is built or the model imported.
    for key, value in [("data.source", "os:system"), ("train.loss", "os:system"),
                       ("train.metrics", ["mae", "os:system"]), ("data.args.transform", "os:system")]:  # fmt: skip
        tampered = json.loads((run / "config.resolved.json").read_text())
        *parents, leaf = key.split(".")
        node = tampered
        for part in parents:
            node = node[part]
        node[leaf] = value
        (evil / "config.resolved.json").write_text(json.dumps(tampered))
        assert code_refs(tampered) == [("model.name", "user_models:Net"), (key, "os:system")]
        assert main(["predict", str(evil), "--set", "model.name=user_models:Net"]) == 2
        err = capsys.readouterr().err
        assert f"{key} = 'os:system'" in err and len(err.strip().splitlines()) == 1, err

    # The user's own run still needs the user's word: refused plainly, then accepted with --trust-code or when
    # the user names the same import path on the command line.
    assert main(["predict", str(run)]) == 2
    assert "model.name = 'user_models:Net'" in capsys.readouterr().err
    assert main(["predict", str(run), "--trust-code"]) == 0
    trusted = capsys.readouterr().out
    assert main(["predict", str(run), "--set", "model.name=user_models:Net"]) == 0
    assert capsys.readouterr().out == trusted and "val_accuracy" in trusted
    with pytest.raises(UntrustedCode):
        Surrogate.from_run(run)
    surrogate = Surrogate.from_run(run, trust_code=True)
    assert surrogate([[[[0.0] * 8] * 8]]).shape == (1, 10)

    # caldera serve --trust-code serves the user's model over HTTP.
    server = subprocess.Popen([sys.executable, "-m", "caldera.cli", "serve", str(run), "--port", "0", "--trust-code"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)  # fmt: skip
    try:
        banner = server.stdout.readline()
        assert "http://" in banner, banner + server.stderr.read()
        url = banner.split("http://", 1)[1].split()[0]
        body = json.dumps({"inputs": [[[[0.5] * 8] * 8]]}).encode()
        request = urllib.request.Request(f"http://{url}/predict", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as reply:
            outputs = json.loads(reply.read())["outputs"]
        assert len(outputs) == 1 and len(outputs[0]) == 10
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert not marker.exists()
