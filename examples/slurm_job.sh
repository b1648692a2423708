#!/bin/bash
# A Slurm job that trains with Caldera, checkpoints before the wall-time limit and requeues itself.
#SBATCH --job-name=heat-surrogate
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one rank per GPU (or per socket on CPU nodes)
#SBATCH --time=02:00:00
#SBATCH --signal=USR1@120            # SIGUSR1 to every task of the job steps 120 s before the limit
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=heat-%j.out
#
# Why `USR1@120` and not `B:USR1@120`: with `B:` Slurm signals only this batch shell. Without a trap the shell dies
# of SIGUSR1, the ranks never hear of it, train on until the hard limit kills them, and nobody requeues. Without
# `B:` the ranks get SIGUSR1 themselves: each finishes its step, they write one checkpoint together and exit 85.
#
# Why srun runs in the background: on `scancel` or preemption Slurm sends SIGTERM to every process of the job,
# this shell included, and bash dies of a SIGTERM that arrives while it waits for a foreground command. The ranks
# got their own SIGTERM (they checkpoint and exit 85 just as for USR1); the trap keeps this shell alive to wait
# for them and requeue. `wait` returns early (code > 128) when a trapped signal arrives, hence the loop.
trap 'echo "batch shell: SIGTERM; waiting for the ranks to checkpoint" >&2' TERM

# `--resume` starts fresh when the run has no checkpoint yet, so the same line serves the first run and requeues.
# Arguments given to sbatch after the script name are added to the command (e.g. --set optim.lr=1e-3).
srun caldera train examples/heat_surrogate.toml --resume --set checkpoint.every=10m "$@" &
step=$!
wait "$step"
code=$?
while [ "$code" -gt 128 ] && kill -0 "$step" 2>/dev/null; do
  wait "$step"
  code=$?
done

# 85 = stopped for the wall time with a checkpoint written: put the job back in the queue.
if [ "$code" -eq 85 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
