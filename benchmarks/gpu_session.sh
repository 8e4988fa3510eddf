#!/usr/bin/env bash
# The device checks one GPU session runs (sessions get 15 minutes of device time), as one
# command on the device machine, from the repository root:
#
#   bash benchmarks/gpu_session.sh        # with $OUT set by the device tool
#
# 1. tests/gpu: the engine's CUDA paths (training, every method as a job, jobs keeping
#    their data on the GPU, the unlearn CLI, a tiny benchmark);
# 2. benchmarks/job_timing.py at the `full` suite's scale on the committed indoor original
#    (benchmarks/full/cache): the job's wall time against the recipe's, with the data
#    kept on the GPU and gathered on the host, seeds 0 and 1, full:8 and partial:depth.
# Writes gpu_tests.log, job_timing_indoor.json and job_timing.log to $OUT. About 5
# minutes on an H100 by the 2026-11-25 probe's figures (rendering with 16 processes, 8 jobs).
set -uo pipefail
: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
timeout 150 "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"
timeout 400 "$PYTHON" benchmarks/job_timing.py --suite full --benchmark indoor --cache-dir benchmarks/full/cache \
  --seeds 0 1 --settings full:8 partial:depth --data resident host \
  --out "$OUT/job_timing_indoor.json" 2>&1 | tail -n 40 | tee "$OUT/job_timing.log"
