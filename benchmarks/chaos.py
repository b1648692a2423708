"""Chaos: kill -9 a small training run at random moments, resume it, and compare with an unbroken run.

    python benchmarks/chaos.py [--trials 100] [--max-kills 2] [--ranks 1] [--seed 0] [--every N]

Each trial starts the run (a dropout MLP with momentum SGD and an LR schedule, asynchronous checkpoints every
--every steps, by default 2, 5, 10 or 25 at random per trial, keep=2), waits until it trains, SIGKILLs it (with --ranks N: one random rank, as a node failure
would; mpiexec then ends the others) after a random fraction of the training time, between 1 and --max-kills
times, each restart resuming; a last resume runs to the end. The final weights must equal the unbroken run's bit
for bit (CPU runs are deterministic). Prints trials / divergent / failed to resume, and where the kills landed.
Exit code 1 if any trial diverged or failed to resume.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SAMPLES, BATCH, EPOCHS = 512, 16, 4
STEPS = EPOCHS * SAMPLES // BATCH
EVERY = (2, 5, 10, 25)  # checkpoint intervals (steps) the trials draw from
_CTX = multiprocessing.get_context("forkserver")


# -- the run under test (``--worker RUN_DIR``) ------------------------------------------------------------------------
def worker(run_dir: str, every: int, resume: bool) -> None:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import caldera
    from caldera.checkpoint import Checkpointer

    world = caldera.init(seed=11)
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(SAMPLES, 64, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g))
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(),
                          nn.Dropout(0.2), nn.Linear(256, 10))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))

    class Started(caldera.Callback):
        """Tell the chaos driver (through a file) that this process trains and where its ranks are."""

        def on_step_end(self, trainer):
            if not getattr(self, "done", False):
                self.done = True
                Path(run_dir, f"pid-{world.rank}").write_text(str(os.getpid()))

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), world, every=every, keep=2)
    trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=EPOCHS, batch_size=BATCH, run_dir=run_dir,
                              strategy="allreduce" if world.size > 1 else "single", scheduler=sched, seed=3,
                              callbacks=[Started()], checkpointer=ckpt, progress=False, plot=False,
                              resume=resume)  # fmt: skip
    trainer.fit(data, data)


# -- the driver -------------------------------------------------------------------------------------------------------
def _single(run_dir: str, every: int, resume: bool) -> None:
    """A one-process run, forked by the fork server: its output goes to RUN_DIR/log.txt."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    worker(run_dir, every, resume)


class Run:
    """One start of the run: a process of its own (one rank: forked from a fork server that has imported torch
    once, which saves ~4 s a start; N ranks: mpiexec). Killed with SIGKILL, never asked to stop."""

    def __init__(self, run_dir: Path, ranks: int, every: int, resume: bool) -> None:
        self.run_dir, self.ranks = run_dir, ranks
        if ranks == 1:
            self.proc = _CTX.Process(target=_single, args=(str(run_dir), every, resume))
            self.proc.start()
            return
        mpiexec = Path(sys.executable).parent / "mpiexec"
        exe = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec") or "mpiexec"
        cmd = [exe, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), sys.executable, str(HERE),
               "--worker", str(run_dir), "--every", str(every), *(["--resume"] if resume else [])]  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "log.txt", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env())

    def poll(self) -> int | None:
        if self.ranks == 1:
            return self.proc.exitcode
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        if self.ranks == 1:
            self.proc.join(timeout)
            return self.proc.exitcode
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.wait(60)


def env() -> dict[str, str]:
    src = str(HERE.parents[1] / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{src}:{path}" if path else src}


def run_to_end(run_dir: Path, ranks: int, every: int, resume: bool, timeout: float = 600) -> tuple[int, str]:
    """Run to the end; return (exit code, -1 past ``timeout``) and this start's output."""
    log = run_dir / "log.txt"
    before = log.stat().st_size if log.exists() else 0
    run = Run(run_dir, ranks, every, resume)
    code = run.wait(timeout)
    if code is None:
        run.kill()
    with open(log, "rb") as f:
        f.seek(before)
        return (-1 if code is None else code), f.read().decode(errors="replace")


def run_and_kill(
    run_dir: Path, ranks: int, every: int, resume: bool, delay: float, rng: random.Random
) -> str:
    """Start the run, wait until it trains, SIGKILL it (one random rank) ``delay`` s later; say where it landed."""
    for f in run_dir.glob("pid-*"):
        f.unlink()
    run = Run(run_dir, ranks, every, resume)
    try:
        deadline = time.monotonic() + 300
        while len(list(run_dir.glob("pid-*"))) < ranks and run.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the run did not start training within 300 s")
            time.sleep(0.005)
        time.sleep(delay)
        if run.poll() is not None:
            return "after the end"
        victim = int((run_dir / f"pid-{rng.randrange(ranks)}").read_text())
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:  # that rank has just finished: the job is ending on its own
            run.wait(120)
            return "after the end"
        run.wait(120)
        # A checkpoint directory still under construction: the kill interrupted a background write.
        return "mid-write" if any(run_dir.glob("checkpoints/.step-*.tmp")) else "mid-training"
    finally:
        if run.poll() is None:
            run.kill()


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def chaos(trials: int, max_kills: int = 2, ranks: int = 1, seed: int = 0, every: int | None = None,
          workdir: Path | None = None, log=print) -> dict:  # fmt: skip
    """Run the trials; return counts: trials, divergent, failed (to resume), kills mid-training (of them during a
    checkpoint write) / after the end, and the step each trial's last start resumed from."""
    rng = random.Random(seed)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="caldera-chaos-"))
    t0 = time.monotonic()
    ref, seconds = tmp / "reference", {}

    def train_seconds(interval: int) -> float:
        """How long an unbroken run with this checkpoint interval trains (start-up excluded), measured once.
        Every such run must end with the first one's weights: the interval does not change the weights."""
        if interval not in seconds:
            run_dir = tmp / f"unbroken-{interval}"
            code, out = run_to_end(run_dir, ranks, interval, resume=False)
            if code != 0:
                raise RuntimeError(f"the unbroken run failed (exit code {code}):\n{out[-3000:]}")
            if not ref.exists():
                shutil.copytree(run_dir, ref)
            elif not same_weights(ref / "model.pt", run_dir / "model.pt"):
                raise RuntimeError(f"unbroken runs with different checkpoint intervals disagree ({interval})")
            seconds[interval] = (run_dir / "model.pt").stat().st_mtime - (run_dir / "pid-0").stat().st_mtime
            log(f"unbroken run, checkpoints every {interval} steps: trains ~{seconds[interval]:.2f} s")
            shutil.rmtree(run_dir)
        return max(0.05, seconds[interval])

    train_seconds(every or EVERY[0])
    result = {"trials": 0, "divergent": 0, "failed": 0, "mid_training": 0, "mid_write": 0, "after_the_end": 0,
              "resumed_from": [], "bad": []}  # fmt: skip
    for trial in range(trials):
        run_dir = tmp / f"trial-{trial:03d}"
        kills = rng.randint(1, max_kills)
        interval = every or rng.choice(EVERY)
        landed = []
        for k in range(kills):
            # A random moment of what is left to train (a resumed run starts at its newest checkpoint); 0.8: the
            # measured runs (the fork server's first) can be slower than the trials; a kill after the end is wasted.
            done = max([int(c.name.split("-")[1]) for c in run_dir.glob("checkpoints/step-*")] or [0])
            delay = rng.uniform(0, 0.8 * (1 - done / STEPS) * train_seconds(interval))
            landed.append(run_and_kill(run_dir, ranks, interval, k > 0, delay, rng))
        result["mid_write"] += landed.count("mid-write")
        result["mid_training"] += landed.count("mid-training") + landed.count("mid-write")
        result["after_the_end"] += landed.count("after the end")
        code, out = run_to_end(run_dir, ranks, interval, resume=True)
        result["trials"] += 1
        if code != 0 or not (run_dir / "model.pt").exists():
            result["failed"] += 1
            result["bad"].append(
                {"trial": trial, "outcome": "failed to resume", "code": code, "out": out[-2000:]}
            )
            status = f"FAILED to resume (exit code {code})"
        elif not same_weights(ref / "model.pt", run_dir / "model.pt"):
            result["divergent"] += 1
            result["bad"].append({"trial": trial, "outcome": "divergent", "out": out[-2000:]})
            status = "DIVERGENT"
        else:
            # Where the last start resumed: a restore that loaded nothing would retrain from step 0 and still match.
            steps = re.findall(r"resumed from .* global step (\d+)\)", out)
            result["resumed_from"].append(int(steps[-1]) if steps else 0)
            status = f"identical (resumed at step {result['resumed_from'][-1]} of {STEPS})"
            shutil.rmtree(run_dir)
        log(
            f"trial {trial + 1}/{trials}: checkpoints every {interval} steps, {kills} kill(s) ({', '.join(landed)}), "
            f"resumed: {status}"
        )
    result["seconds"] = time.monotonic() - t0
    if not result["bad"] and workdir is None:
        shutil.rmtree(tmp)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--max-kills", type=int, default=2, help="kills per trial: 1 to this many (default 2)")
    p.add_argument("--ranks", type=int, default=1, help="1: one process; N: mpiexec -n N, one rank killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--every", type=int, help="checkpoint every this many steps (default: 2, 5, 10 or 25 at random)"
    )
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--worker", metavar="RUN_DIR", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.every, args.resume)
        return 0
    os.environ.update(env())  # the fork server and mpiexec's ranks: one thread each, this source tree
    sys.path.insert(0, env()["PYTHONPATH"].split(":")[0])
    # torch._dynamo: an optimizer's constructor imports it, 2 s a start on a busy machine.
    _CTX.set_forkserver_preload(["torch", "torch._dynamo", "caldera", "caldera.checkpoint", "caldera.train"])
    r = chaos(args.trials, args.max_kills, args.ranks, args.seed, args.every)
    print(f"trials {r['trials']}  divergent {r['divergent']}  failed to resume {r['failed']}  "
          f"(kills: {r['mid_training']} mid-training, {r['mid_write']} of them during a checkpoint write, "
          f"{r['after_the_end']} after the end; "
          f"{r['seconds']:.0f} s, --ranks {args.ranks} --max-kills {args.max_kills} --seed {args.seed})")  # fmt: skip
    for bad in r["bad"]:
        print(json.dumps(bad))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 1 if r["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
