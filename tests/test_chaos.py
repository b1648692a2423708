"""Chaos, CI-sized: kill -9 a small training run at seeded random moments (during steps, during background
checkpoint writes), resume, and get the unbroken run's weights bit for bit (benchmarks/chaos.py, 3 trials)."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_kill9_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "benchmarks/chaos.py", "--trials", "3", "--max-kills", "2", "--seed", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["trials"] == 3 and result["divergent"] == 0 and result["failed"] == 0
    assert result["mid_training"] >= 2  # the kills interrupted training, not a finished run
    # The resumed runs continued from a checkpoint mid-run: a restore that loaded nothing would retrain from
    # step 0 and match the weights just the same.
    assert any(0 < step < 128 for step in result["resumed_from"]), result["resumed_from"]
