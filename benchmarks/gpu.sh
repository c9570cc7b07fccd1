#!/usr/bin/env bash
# The GPU checks, in one go (a few minutes): the CUDA tests, then the GPU overhead grid.
# Run from the repository root on a machine with a CUDA GPU and torch installed, with the
# native module built (pip install -e . here, or carry python/neural_mechanics/_native*.so).
#     bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_reducers.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
timeout 300 python3 benchmarks/bench_overhead.py --net vgg16 --device cuda --block 16 --rounds 3 --threads 8 \
    --json "$out/overhead_vgg16_cuda.json" 2>&1 | tee "$out/overhead_vgg16_cuda.txt" || status=1
timeout 120 python3 benchmarks/bench_overhead.py --net acceptance --device cuda --block 64 --rounds 3 --threads 8 \
    --json "$out/overhead_acceptance_cuda.json" 2>&1 | tee "$out/overhead_acceptance_cuda.txt" || status=1
exit $status
