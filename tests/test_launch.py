"""`caldera launch` keeps requeues correct: exit 85 is passed through (never relaunched), stop signals reach the
ranks as SIGUSR1 (they checkpoint and exit 85) and no rank outlives the launcher; relaunches keep the clock;
examples/slurm_job.sh requeues after SIGTERM; async-shared from a script without the main guard is one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import caldera
from caldera.checkpoint import REQUEUE_EXIT_CODE, Checkpointer, verify
from caldera.config import load_config
from caldera.durations import job_time_left
from caldera.launch import with_remaining_time
from caldera.train.run import train
from tests.conftest import ROOT, mpiexec

RUN_FILE = """\
[run]
name = "tiny"
dir = "{dir}"
[model]
name = "unet_small"
args = {{ in_channels = 2, out_channels = 1, channels = 4 }}
[data]
source = "heat"
args = {{ n_samples = 64, grid = 16, steps = 5 }}
batch_size = 16
val_fraction = 0.25
[optim]
name = "adam"
lr = 2e-3
epochs = 1000
[train]
loss = "mse"
plot = false
progress = false
[checkpoint]
every = 100000
"""


def tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run file that trains for as long as it is let (1000 epochs of 3 steps); returns (run file, run dir)."""
    run_dir = tmp_path / "run"
    run_file = tmp_path / "tiny.toml"
    run_file.write_text(RUN_FILE.format(dir=run_dir))
    return run_file, run_dir


def launch_cmd(*args: str) -> list[str]:
    mpiexec()  # skips when there is no MPI
    return [sys.executable, "-m", "caldera.cli", "launch", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def processes_naming(marker: str) -> list[str]:
    """Command lines of the live processes whose arguments contain ``marker`` (read from /proc, no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":  # a zombie has exited; only its parent's wait is missing
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.mpi
def test_requeue_exit_is_passed_through_not_relaunched(tmp_path):
    run_file, run_dir = tiny_run(tmp_path)
    proc = subprocess.run(launch_cmd("-n", "2", "--max-restarts", "2", "--", sys.executable, "-m", "caldera.cli",
                                     "train", str(run_file), "--time-limit", "0"),
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=env())  # fmt: skip
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
    # One launch: the job's banner and its stop line appear once, and the launcher says why it did not relaunch.
    assert proc.stdout.count("UNetSmall (") == 1, proc.stdout
    assert proc.stderr.count("caldera: stopped (time limit") == 1
    assert "restart" not in proc.stderr and "not relaunched" in proc.stderr
    saved = Checkpointer(run_dir / "checkpoints", caldera.init()).list()
    assert [p.name for p in saved] == ["step-000000001"]


def wait_for_training(proc: subprocess.Popen, run_dir: Path) -> None:
    """Return once the first epoch is recorded: the ranks train, with their stop handlers in place."""
    deadline, log = time.monotonic() + 120, run_dir / "metrics.jsonl"
    while not (log.exists() and log.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)


@pytest.mark.mpi
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_launch_checkpoints_every_rank_and_leaves_no_rank_behind(tmp_path, sig):
    """SIGTERM: the launcher asks the ranks to checkpoint and passes their 85 on. SIGKILL: the launcher is gone,
    but the job gets SIGUSR1 as it dies (PR_SET_PDEATHSIG) and checkpoints all the same."""
    run_file, run_dir = tiny_run(tmp_path)
    proc = subprocess.Popen(launch_cmd("-n", "2", "--", sys.executable, "-m", "caldera.cli", "train", str(run_file)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())  # fmt: skip
    try:
        wait_for_training(proc, run_dir)
        assert len(processes_naming(str(run_file))) >= 3  # mpiexec and two ranks
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)  # the ranks hold the pipes open until they exit
    finally:
        proc.kill()
    if sig == signal.SIGTERM:
        assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
        assert "SIGTERM: asking the ranks to checkpoint" in err
    assert "SIGUSR1 on rank 0, SIGUSR1 on rank 1" in err, err[-3000:]  # both ranks were told, neither killed
    stop = Checkpointer(run_dir / "checkpoints", caldera.init()).latest()
    assert stop is not None and verify(stop) is None
    assert stop.name in err
    time.sleep(0.5)
    assert processes_naming(str(run_file)) == []


@pytest.mark.mpi
def test_ranks_that_ignore_the_stop_request_are_ended_after_the_grace_period(tmp_path):
    marker = str(tmp_path / "stubborn")
    stubborn = f"import signal, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); open({marker!r}, 'a'); " \
               "time.sleep(120)"  # fmt: skip
    proc = subprocess.Popen(launch_cmd("-n", "2", "--grace", "1", "--", sys.executable, "-c", stubborn),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())  # fmt: skip
    try:
        while not Path(marker).exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1)  # both ranks past their handler set-up
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode not in (0, REQUEUE_EXIT_CODE)
    assert "did not stop in time: sending SIGTERM" in err
    assert time.monotonic() - t0 < 20
    time.sleep(0.5)
    assert processes_naming(marker) == []


def test_a_relaunch_keeps_the_wall_clock():
    assert with_remaining_time(["train", "r.toml", "--time-limit", "01:00:00"], 600.4) == \
        ["train", "r.toml", "--time-limit", "2999"]  # fmt: skip
    assert with_remaining_time(["--time-limit=10m", "x"], 1000) == ["--time-limit=0", "x"]
    assert with_remaining_time(["--time-limit", "soon"], 5) == ["--time-limit", "soon"]  # train rejects it
    assert with_remaining_time(["train", "r.toml"], 5) == ["train", "r.toml"]


def test_slurm_job_script_survives_sigterm_and_requeues(tmp_path):
    """examples/slurm_job.sh under a stand-in srun (runs the task itself) and scontrol (records its arguments):
    Slurm's SIGTERM to every process of the job leaves the batch shell alive to requeue the checkpointed run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {tmp_path / "scontrol.txt"}\n')
    (bin_dir / "caldera").write_text(f'#!/bin/bash\nexec {sys.executable} -m caldera.cli "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "run"
    small = ["data.args.n_samples=64", "data.args.grid=16", "data.args.steps=5", "model.args.channels=4",
             "optim.epochs=1000", "train.progress=false", "train.plot=false", f"run.dir={run_dir}"]  # fmt: skip
    job_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    shell = subprocess.Popen(["bash", "examples/slurm_job.sh", *[a for s in small for a in ("--set", s)]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=job_env)  # fmt: skip
    try:
        wait_for_training(shell, run_dir)
        (task,) = [int(p.split(":")[0]) for p in processes_naming(f"run.dir={run_dir}") if "caldera.cli" in p]
        shell.send_signal(signal.SIGTERM)  # Slurm signals the batch shell and the step's tasks alike
        time.sleep(0.5)
        os.kill(task, signal.SIGTERM)
        _, err = shell.communicate(timeout=120)
    finally:
        shell.kill()
    assert shell.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert Checkpointer(run_dir / "checkpoints", caldera.init()).latest() is not None


ASYNC_SCRIPT = """\
import torch
from torch import nn
import caldera
import caldera.parallel.async_shared  # noqa: F401
from caldera.data import digits, split_dataset


def main():
    caldera.init(seed=0)
    train, val = split_dataset(digits(), 0.2, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                              max_epochs=1, batch_size=64, strategy="async-shared",
                              strategy_options={{"workers": 2}}, progress=False, plot=False)
    trainer.fit(train, val)
    print("DONE")


{call}
"""


def test_async_shared_from_a_script_without_the_main_guard_is_one_line(tmp_path):
    # The guarded side (the same check passing) runs in every async-shared test: tests/scripts/async_*.py.
    script = tmp_path / "train.py"
    script.write_text(ASYNC_SCRIPT.format(call="main()"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**env(), "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # no worker was started: no traceback, no leaked semaphores
    assert 'put the training code under `if __name__ == "__main__":`' in lines[0]


@pytest.mark.mpi
def test_torchrun_refuses_a_strategy_that_needs_mpi_in_one_line(tmp_path):
    """torchrun from the torch wheel starts 2 processes; async-ps calls MPI itself: the job stops with one line
    naming the launch to use (exit code 2), before anything is written. Each process refuses alike, but the first
    to exit makes torchrun's agent stop the other, which may not have printed its line yet."""
    torchrun = Path(sys.executable).parent / "torchrun"  # the console entry, as users type it
    (tmp_path / "same.toml").write_text(SAME_RUN)
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "caldera", "train", "same.toml",
           "--set", "parallel.strategy=async-ps", "--set", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode != 0
    refusals = [
        line for line in proc.stderr.splitlines() if line.startswith("caldera: error: strategy 'async-ps'")
    ]
    assert 1 <= len(refusals) <= 2 and all("caldera launch -n 2" in r for r in refusals), proc.stderr[-2000:]
    assert "exitcode  : 2" in proc.stderr  # torchrun's report: the process's own exit code
    assert not (tmp_path / "run").exists()


def test_a_launcher_announcing_more_ranks_than_mpi_sees_is_stopped():
    """mpiexec from another MPI (or srun without PMI for this one): the launcher says 2, MPI says 1."""
    code = "import caldera; caldera.init()"
    env = {**os.environ, "OMPI_COMM_WORLD_SIZE": "2"}  # what a foreign launcher announces; MPI starts alone
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "the launcher started 2 ranks but MPI sees 1" in proc.stderr, proc.stderr[
        -2000:
    ]


SAME_RUN = """\
[run]
name = "same"
seed = 0
[model]
name = "mlp"
args = { sizes = [64, 32, 10] }
[data]
source = "digits"
batch_size = 64
val_fraction = 0.2
[optim]
name = "sgd"
lr = 0.05
epochs = 2
[train]
loss = "cross_entropy"
plot = false
progress = false
[parallel]
strategy = "allreduce"
"""
# What srun sets in each task (and no Open MPI variable): the ranks must still come from MPI, not one run each.
SRUN_LIKE = (
    "env -u OMPI_COMM_WORLD_SIZE -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_LOCAL_RANK -u OMPI_COMM_WORLD_LOCAL_SIZE "
    "-u OMPI_COMM_WORLD_NODE_RANK SLURM_JOB_ID=4242 SLURM_NTASKS=2 SLURM_NPROCS=2 SLURM_STEP_NUM_TASKS=2 "
    "SLURM_NNODES=1 SLURM_NODEID=0 SLURM_PROCID=$OMPI_COMM_WORLD_RANK SLURM_LOCALID=$OMPI_COMM_WORLD_LOCAL_RANK "
    '"$@"'
)


@pytest.mark.mpi
def test_the_same_run_file_gives_the_same_weights_alone_under_mpiexec_srun_and_torchrun(tmp_path):
    """Data parallel with the same global batch is the same math: one process (in this one), mpiexec -n 2,
    mpiexec -n 2 with only srun's variables (through the `caldera` console entry), torchrun --nproc-per-node 2."""
    run_file = tmp_path / "same.toml"
    run_file.write_text(SAME_RUN)
    train_args = ["train", str(run_file), "--set"]
    mpi = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "2"]
    console = str(Path(sys.executable).parent / "caldera")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    commands = {
        "mpiexec": [*mpi, sys.executable, "-m", "caldera", *train_args],
        "srun": [*mpi, "sh", "-c", SRUN_LIKE, "sh", console, *train_args],
        "torchrun": [*torchrun, "-m", "caldera", *train_args],
    }
    # Side by side: each launch mostly waits for its processes to start (seconds on a busy machine).
    started = {name: subprocess.Popen([*cmd, f"run.dir={tmp_path / name}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())
               for name, cmd in commands.items()}  # fmt: skip
    try:
        train(load_config(run_file, [f"run.dir={tmp_path / 'one'}"]))
        runs = {name: (proc, *proc.communicate(timeout=240)) for name, proc in started.items()}
    finally:
        for proc in started.values():
            proc.kill()
    reference = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    for name, (proc, out, err) in runs.items():
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        assert "2 rank(s), global batch 64 = 2 x 32" in out, f"{name}: {out[-2000:]}"
        weights = torch.load(tmp_path / name / "model.pt", weights_only=True)
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_time_limit_auto_reads_the_slurm_job_end_and_checkpoints_before_it(tmp_path, monkeypatch):
    """SLURM_JOB_END_TIME 62 s away and the usual 60 s margin: a real run stops at its first step boundary with a
    checkpoint and exit code 85. squeue's %L is read when the variable is missing; outside Slurm: no limit."""
    run_file = tmp_path / "same.toml"
    run_file.write_text(SAME_RUN)
    job = {**env(), "SLURM_JOB_END_TIME": str(int(time.time()) + 62)}
    cmd = [sys.executable, "-m", "caldera", "train", str(run_file), "--time-limit", "auto", "--set",
           "optim.epochs=1000", "--set", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=job)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
    assert (
        "min left in the job (SLURM_JOB_END_TIME); stopping with a checkpoint 60 s before it" in proc.stdout
    )
    stop = Checkpointer(tmp_path / "run" / "checkpoints", caldera.init()).latest()
    assert stop is not None and verify(stop) is None and stop.name in proc.stderr
    # Without the variable: squeue (a stand-in printing what Slurm's %L prints) for this job, or nothing at all.
    (tmp_path / "squeue").write_text('#!/bin/sh\n[ "$*" = "-h -j 77 -o %L" ] && echo 1-02:03:04\n')
    (tmp_path / "squeue").chmod(0o755)
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert job_time_left() == (93784.0, "squeue -j 77 -o %L")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert job_time_left()[0] is None and "not inside a Slurm job" in job_time_left()[1]


@pytest.mark.mpi
def test_plain_ddp_under_mpiexec_gets_its_process_group_from_mpi_and_the_hang_watchdog(tmp_path):
    """examples/ddp_from_mpi.py on 2 ranks, no MASTER_ADDR/MASTER_PORT given: DDP trains (the loss falls), then
    rank 1 stops in the last epoch and the watchdog ends the job naming it (exit code 124)."""
    bare = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
           str(ROOT / "examples" / "ddp_from_mpi.py"), "--smoke", "--hang-timeout", "2", "--stall-rank", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=bare)
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert "2 rank(s), gloo on cpu; rendezvous at " in proc.stdout, proc.stdout
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(losses) == 2 and losses[1] < 0.5 * losses[0], proc.stdout  # the last epoch never ends
    assert "The others wait for rank(s) 1 (epoch 3, step 32, loading a batch)" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert "in main\n    time.sleep(3600)" in proc.stderr  # rank 1's own stack


@pytest.mark.mpi
def test_a_caldera_command_launched_without_caldera_in_front_runs_as_caldera(tmp_path):
    """`caldera launch -n 2 check run.toml`, as users type it: a subcommand's name alone (no program of that name
    on PATH) runs this Python's caldera on every rank, not Open MPI's "executable not found"."""
    run_file = ROOT / "examples" / "digits_tensor.toml"
    proc = subprocess.run([sys.executable, "-m", "caldera", "launch", "-n", "2", "check", str(run_file)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each rank printed the resolved config.
    assert proc.stdout.count('"name": "digits-tensor"') == 2, proc.stdout[-2000:]
