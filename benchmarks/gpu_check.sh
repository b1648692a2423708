#!/bin/bash
# Every GPU check in one command (about 6 minutes on one H200), logs under OUT_DIR (default gpu-check/):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# The main job on the GPU, precision speed (bench_precision), the mixed-precision solver on the GPU (bench_linalg),
# data parallel over NCCL (two ranks: needs two GPUs; with one, Caldera's one-GPU-per-rank refusal is checked),
# serving (bench_serve), online training (examples/heat_online.py) and the three science applications (shortened)
# on the GPU, and the single-process
# trainer/precision/sampler/coupling tests with CUDA visible. Needs caldera installed (pip install -e ".[test]").
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
step() { echo; echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'nccl', torch.cuda.nccl.version())"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

step "main job on the GPU"
timeout 180 caldera train examples/heat_surrogate.toml > "$out/main_job.log" 2>&1; echo "exit $?"
grep -a -E "on cuda|^epoch 15|input-bound|rror" "$out/main_job.log" | tail -4

step "precision: caldera.Trainer vs hand-written autocast loop"
timeout 420 python3 benchmarks/bench_precision.py > "$out/bench_precision.log" 2>&1; echo "exit $?"
grep -a -E "^#|parameters, batch|^precision|^fp32|^bf16|^fp16|rror" "$out/bench_precision.log"

step "mixed-precision solve on the GPU"
timeout 120 python3 benchmarks/bench_linalg.py --device cuda --sizes 4096 16384 2>&1 | tee "$out/bench_linalg.log"

step "data parallel, 2 ranks ($gpus GPU(s))"
timeout 120 mpiexec --oversubscribe -n 2 python3 tests/scripts/dp_equivalence.py mlp 256 64 2 1 1 mpi \
    > "$out/dp_2ranks.log" 2>&1; echo "exit $?"
if [ "$gpus" -ge 2 ]; then
    grep -a "max_diff" "$out/dp_2ranks.log"  # NCCL: must match one process (max_diff < 1e-5, spread 0)
else
    grep -a -o "NCCL needs one GPU per rank[^.]*" "$out/dp_2ranks.log" | head -1  # the refusal, not a crash
fi

step "serving on the GPU: dynamic batching vs one forward pass per request"
timeout 150 python3 benchmarks/bench_serve.py --requests 20 2>&1 | tee "$out/bench_serve.log" | tail -3

step "online training beside the heat simulation, on the GPU"
timeout 150 python3 examples/heat_online.py --rounds 60 --run-dir "$out/heat-online" > "$out/heat_online.log" 2>&1
echo "exit $?"; grep -a -E "^val_loss|leap [14]:|time for|rror" "$out/heat_online.log" | tail -5

step "science applications on the GPU (shortened): forces by double backward, HDF5 patches, NetCDF"
timeout 150 caldera train examples/materials_potential.toml --set optim.epochs=5 --set run.dir="$out/materials" \
    --set train.progress=false > "$out/materials.log" 2>&1; echo "exit $?"
grep -a -E "on cuda|^epoch 5|rror" "$out/materials.log" | tail -3
timeout 150 caldera train examples/imaging_denoise.toml --set optim.epochs=2 --set run.dir="$out/imaging" \
    --set train.progress=false > "$out/imaging.log" 2>&1; echo "exit $?"
grep -a -E "on cuda|^epoch 2|rror" "$out/imaging.log" | tail -3
timeout 200 caldera train examples/climate_forecast.toml --set optim.epochs=2 --set data.args.days=180 \
    --set run.dir="$out/climate" --set train.progress=false > "$out/climate.log" 2>&1; echo "exit $?"
grep -a -E "on cuda|^epoch 2|rror" "$out/climate.log" | tail -3

step "tests with CUDA visible"
# -o addopts="": serial, so the lent machine needs no pytest-xdist.
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_trainer.py tests/test_precision.py \
    tests/test_sampler.py tests/test_coupling.py -k "not two_ranks and not separate and not coupled and not failing" \
    > "$out/pytest.log" 2>&1
grep -a -E "passed|failed|FAILED" "$out/pytest.log" | tail -8
step done
