"""caldera export: every artefact, reloaded on its own, computes what the eager model computes, in physical units."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from caldera.cli import main
from caldera.config import load_config
from caldera.export import export
from caldera.predict import load_run_config, predict
from caldera.train.run import build_data, build_model, train
from caldera.train.rundir import git_commit
from tests.conftest import tiny_run

h5py = pytest.importorskip("h5py")
ort = pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("onnxscript")

FILES = {"safetensors": "model.safetensors", "torchscript": "model.ts", "exported": "model.exported.pt2",
         "aoti": "model.aoti.pt2", "onnx": "model.onnx"}  # fmt: skip


@pytest.fixture(scope="module")
def heat(tmp_path_factory):
    """A heat run exported once in every format (the AOTInductor compile is the slow part: once per session)."""
    run = tiny_run(tmp_path_factory.mktemp("export") / "run")
    result = export(run, out=run / "export")
    return run, result


def test_every_artefact_reloaded_on_its_own_equals_the_eager_model_at_any_batch_size(heat):
    run, result = heat
    out = run / "export"
    assert result.code == 0 and not result.failed, result.failed
    # Every file, and no partial ones.
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), "model.json"])
    cfg = load_run_config(run)
    eager = build_model(cfg, weights=False)
    eager.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    eager.eval()
    _, val = build_data(cfg)
    x = torch.stack([val[i][0] for i in range(7)])
    # Each artefact through its own runtime, nothing of caldera's in between.
    state = safetensors_torch.load_file(out / "model.safetensors")  # tensors only, no pickle
    fresh = build_model(cfg, weights=False)
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    aoti = torch._inductor.aoti_load_package(str(out / "model.aoti.pt2"))
    runners = {
        "safetensors": fresh.eval(),
        "torchscript": torch.jit.load(str(out / "model.ts")),
        "exported": torch.export.load(str(out / "model.exported.pt2")).module(),
        "aoti": lambda b: aoti(b),
        "onnx": lambda b: torch.from_numpy(session.run(None, {"x": b.numpy()})[0]),
    }
    with torch.no_grad():
        for batch in (1, 7):  # the batch axis is dynamic: the example batch was 2
            want = eager(x[:batch])
            for name, run_it in runners.items():
                got = run_it(x[:batch])
                got = got[0] if isinstance(got, (list, tuple)) else got
                assert got.shape == (batch, 1, 16, 16), name
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{name} at batch {batch}")
    # The package carries the contract's metadata for the C API.
    meta = aoti.get_metadata()
    assert meta["caldera.inputs"] == "x:float32:-1,2,16,16"
    assert meta["caldera.outputs"] == "y:float32:-1,1,16,16"
    assert meta["caldera.device"] == "cpu" and meta["caldera.format"] == "1"

    card = json.loads((out / "model.json").read_text())
    identity, summary = (json.loads((run / f).read_text()) for f in ("run.json", "summary.json"))
    assert card["inputs"][0]["shape"] == [-1, 2, 16, 16] and card["inputs"][0]["dtype"] == "float32"
    assert card["outputs"][0]["name"] == "y" and card["outputs"][0]["shape"] == [-1, 1, 16, 16]
    assert card["normalization"] is None  # the heat source trains on physical values
    assert set(card["artefacts"]) == set(FILES)
    for key, entry in card["artefacts"].items():
        check = entry["verification"]
        assert entry["file"] == FILES[key] and check["ok"] and check["split"] == "val", (key, entry)
        assert check["max_abs_error"] == result.checks[key].max_abs_error < 1e-5
        assert check["batch_sizes"] == [32, 1] and len(entry["sha256"]) == 64
    assert card["config_hash"] == identity["config_hash"] == card["training_config_hash"]
    assert card["config"]["data"]["source"] == "heat" and len(card["data_fingerprint"]["sha256"]) == 64
    assert card["metrics"] == summary["final"] and card["git"] == identity["git"]
    assert card["versions"]["torch"] == torch.__version__


def test_scientific_data_exports_with_its_normalisation_inside_and_matches_caldera_predict(tmp_path):
    n = 40
    rng = np.random.default_rng(0)
    x = (50 + 10 * rng.normal(size=(n, 2, 8, 8))).astype(np.float32)
    a = (300 + 0.5 * x[:, 0] + rng.normal(scale=0.5, size=(n, 8, 8))).astype(np.float32)  # kelvin-like
    with h5py.File(tmp_path / "fields.h5", "w") as f:
        f["x"], f["a"] = x, a
        f["a"].attrs["units"] = "K"
    cfg = load_config({
        "run": {"dir": str(tmp_path / "run")},
        "model": {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1, "channels": 4}},
        "data": {"source": "scientific", "batch_size": 8, "val_fraction": 0.25,
                 "args": {"path": str(tmp_path / "fields.h5"), "inputs": ["x"], "targets": ["a"]}},
        "optim": {"epochs": 1}, "train": {"progress": False, "plot": False},
    })  # fmt: skip
    train(cfg)
    run = tmp_path / "run"
    assert main(["export", str(run), "--format", "torchscript,onnx", "--out", str(tmp_path / "out")]) == 0
    predict(run, "val", out=tmp_path / "pred.npy", progress=False)
    want = np.load(tmp_path / "pred.npy")  # caldera predict: physical units
    physical = torch.from_numpy(x[30:])  # the file's own values, no normalisation by hand
    ts = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(ts(physical).numpy(), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(session.run(None, {"x": x[30:]})[0], want, rtol=1e-5, atol=1e-4)
    assert abs(want.mean() - 325) < 10  # kelvin, not the normalised units the model works in
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    norm = card["normalization"]
    assert norm["inputs"][0]["mean"] == pytest.approx(float(x[:30].astype(np.float64).mean()), rel=1e-6)
    assert norm["targets"][0]["std"] == pytest.approx(float(a[:30].astype(np.float64).std()), rel=1e-5)
    target = {"variable": "a", "channels": 1, "kind": "field", "units": "K"}  # units: the file's attribute
    assert card["outputs"][0]["variables"] == [target]
    assert card["data_fingerprint"]["files"][0]["size"] == (tmp_path / "fields.h5").stat().st_size


def test_a_missing_package_names_its_install_and_beyond_tolerance_exits_1(heat, tmp_path, monkeypatch, capfd):
    run, _ = heat
    # ONNX Runtime computes in its own order: not bit for bit torch's, so zero tolerance must fail and say so.
    assert (
        main(["export", str(run), "--format", "onnx", "--rtol", "0", "--atol", "0", "--out", str(tmp_path)])
        == 1
    )
    err = capfd.readouterr().err
    assert err.startswith("caldera export: onnx: verification failed: max abs error") and err.count("\n") == 1
    assert not json.loads((tmp_path / "model.json").read_text())["artefacts"]["onnx"]["verification"]["ok"]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    result = export(run, ["safetensors", "onnx"], out=tmp_path / "without", echo=False)
    assert result.code == 2 and result.checks["safetensors"].ok
    assert "needs the onnxscript package: pip install 'caldera[export]'" in result.failed["onnx"]
    assert not (tmp_path / "without" / "model.onnx").exists()


class Branchy(torch.nn.Module):
    """A model with data-dependent control flow: a Python branch on a tensor's value (never taken here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.abs().max() > 1e6:
            y = y / y.abs().max()
        return y


class Pair(Branchy):
    """The same weights, two outputs: the field and its sum over the plate."""

    output_names = ("field", "total")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.sum(dim=(1, 2, 3))


def test_bad_requests_are_one_line_and_an_unexportable_model_still_exports_others(tmp_path, capfd):
    run = tiny_run(tmp_path / "run", model={"name": "tests.test_export:Branchy"}, n_samples=40, grid=8)
    for argv, fix in [(["export", str(tmp_path / "nowhere")], "give the run directory of a finished"),
                      (["export", str(run), "--format", "pt2,tflite"], "choose from safetensors,torchscript"),
                      (["export", str(run)], "--trust-code"),
                      (["export", str(run), "--samples", "0"], "at least 1 sample")]:  # fmt: skip
        assert main(argv) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and fix in err, err
    assert not (run / "export").exists()  # refused before anything was written

    code = main(["export", str(run), "--trust-code", "--format", "safetensors,torchscript,pt2,onnx"])
    err = capfd.readouterr().err
    assert code == 2, err  # the request (every format) cannot be met
    assert all(line.startswith("caldera export: ") for line in err.splitlines()), err  # no graph dumps
    blocked = [line for line in err.splitlines() if "cannot export" in line]
    assert {line.split(":")[1].strip() for line in blocked} == {"exported", "aoti", "onnx"}, err
    for line in blocked:  # the operation that blocks it, where it is in the user's code
        assert "data-dependent control flow" in line and "if y.abs().max() > 1e6" in line, line
    files = sorted(p.name for p in (run / "export").iterdir())
    assert files == ["model.json", "model.safetensors", "model.ts"]  # the failed formats left nothing behind
    card = json.loads((run / "export" / "model.json").read_text())
    assert card["artefacts"]["torchscript"]["verification"]["ok"]
    assert "data-dependent" in card["artefacts"]["onnx"]["error"]

    # A model returning a tuple (given by the user, so trusted): every output, named, through each runtime.
    pair = ["--set", "model.name=tests.test_export:Pair", "--out", str(tmp_path / "pair")]
    assert main(["export", str(run), "--format", "torchscript,onnx", *pair]) == 0
    card = json.loads((tmp_path / "pair" / "model.json").read_text())
    assert [(o["name"], o["shape"]) for o in card["outputs"]] == [("field", [-1, 1, 8, 8]), ("total", [-1])]
    session = ort.InferenceSession(str(tmp_path / "pair" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 2, 8, 8)
    model = Pair()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        want = model(x)
        ts = torch.jit.load(str(tmp_path / "pair" / "model.ts"))
        for got in (ts(x), session.run(None, {"x": x.numpy()})):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(torch.as_tensor(g), w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU package is tested above)")
def test_the_cuda_package_is_compiled_and_verified_on_the_gpu(heat, tmp_path):
    run, _ = heat
    result = export(run, ["pt2"], out=tmp_path, device="cuda", echo=False)
    check = result.checks["aoti-cuda"]
    assert result.code == 0 and check.ok and check.max_abs_error < 1e-4
    package = torch._inductor.aoti_load_package(str(tmp_path / "model.aoti-cuda.pt2"))
    assert package.get_metadata()["caldera.device"] == "cuda"


def test_the_git_commit_a_run_records_is_the_one_git_names(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")

    def sh(*args, cwd=tmp_path / "repo"):
        return subprocess.run(
            [git, *args], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    (tmp_path / "repo" / "sub").mkdir(parents=True)
    sh("init", "-q", "-b", "main")
    (tmp_path / "repo" / "f").write_text("1")
    sh("add", "f")
    sh("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert git_commit(tmp_path / "repo" / "sub") == sh("rev-parse", "HEAD")  # a loose ref, from a subfolder
    sh("pack-refs", "--all")
    assert git_commit(tmp_path / "repo") == sh("rev-parse", "HEAD")  # packed-refs
    sh("worktree", "add", "-q", "-b", "other", str(tmp_path / "wt"))
    assert git_commit(tmp_path / "wt") == sh("rev-parse", "HEAD", cwd=tmp_path / "wt")  # a worktree
    sh("checkout", "-q", "--detach")
    assert git_commit(tmp_path / "repo") == sh("rev-parse", "HEAD")  # detached
