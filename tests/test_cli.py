"""The main job, as a user runs it: `caldera train examples/heat_surrogate.toml`."""

import json
import subprocess
import sys


def test_main_job_trains_and_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "heat"
    proc = subprocess.run(
        [sys.executable, "-m", "caldera.cli", "train", "examples/heat_surrogate.toml",
         "--set", f"run.dir={run_dir}", "--set", "data.args.n_samples=300", "--set", "optim.epochs=3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "epoch 3" in proc.stdout and "val_rel_l2" in proc.stdout
    for name in ("config.toml", "config.resolved.json", "metrics.jsonl", "metrics.csv", "model.pt",
                 "learning_curve.png", "predictions.png"):  # fmt: skip
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["train_loss"]
    assert json.loads((run_dir / "config.resolved.json").read_text())["optim"]["epochs"] == 3
