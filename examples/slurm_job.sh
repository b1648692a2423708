#!/bin/bash
# A Slurm job that trains with Caldera, checkpoints before the wall-time limit and requeues itself.
#SBATCH --job-name=heat-surrogate
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one rank per GPU (or per socket on CPU nodes)
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120          # Slurm sends SIGUSR1 120 s before the limit: Caldera checkpoints and stops
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=heat-%j.out

# `--resume` starts fresh when the run has no checkpoint yet, so the same line serves the first run and requeues.
srun caldera train examples/heat_surrogate.toml --resume --set checkpoint.every=10m
code=$?

# 85 = stopped for the wall time with a checkpoint written: put the job back in the queue.
if [ "$code" -eq 85 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
