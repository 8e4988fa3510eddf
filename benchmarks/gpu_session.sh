#!/usr/bin/env bash
# The device checks one GPU session runs (sessions get 15 minutes of device time), as one
# command on the device machine, from the repository root (the device tool sets $OUT):
#
#   bash benchmarks/gpu_session.sh [tests] [timing] [probe]      # default: all three, in this order
#
# tests   tests/gpu: the engine's CUDA paths (training, every method as a job, a job's data
#         kept on the GPU for the next job, the unlearn CLI, a tiny benchmark);
# timing  benchmarks/job_timing.py at the `full` suite's scale on the committed indoor
#         original (benchmarks/full/cache/full, where the bench keeps it; --require-cached:
#         a miss stops at once instead of training for the whole stage): job against retrain,
#         seed 0, full:8, with the data kept on the GPU and gathered on the host, and with the
#         orthogonalization batched (the default on CUDA) and per tensor (four timed jobs after
#         an untimed warm-up job per data mode);
# probe   benchmarks/gpu_probe.py at the suite's size (288x384) and at 144x192: training
#         steps of batch 8, 16, 32 (fp32, bf16, bf16 channels-last): what a cheaper `full` recipe costs.
# SUITE and CACHE_DIR (default: full, benchmarks/full/cache) let the script be tried on a CPU
# with `smoke` first (the smoke original must then be in CACHE_DIR/smoke). Each stage has its own
# time limit (70 + 300 + 100 + 80 s: under the 10 minutes a command may run); the results go to
# $OUT as each stage ends (job_timing after every job, gpu_probe after every measurement), the
# whole logs too; machine.txt records the GPU and /dev/shm (the render workers' results pass
# through it). The script exits with the first failed stage's status (124: its time limit).
# The files: machine.txt, gpu_tests.log, job_timing_indoor.json, job_timing.log,
# probe_indoor.json, probe_indoor_144x192.json, probe.log (7; the device returns at most 8).
set -uo pipefail
: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUITE=${SUITE:-full}
CACHE_DIR=${CACHE_DIR:-benchmarks/full/cache}
stages=${*:-tests timing probe}
status=0
keep() {  # the first failure's status is the script's
  local rc=$1 what=$2
  if [ "$rc" -ne 0 ]; then
    echo "gpu_session: $what exited $rc" >&2
    [ "$status" -ne 0 ] || status=$rc
  fi
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  df -h /dev/shm 2>&1
  nproc
} | tee "$OUT/machine.txt"
for stage in $stages; do
  case $stage in
    tests)
      UNLEARND_REQUIRE_GPU=1 timeout 70 "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -n 30
      keep "${PIPESTATUS[0]}" "tests/gpu" ;;
    timing)
      timeout 300 "$PYTHON" benchmarks/job_timing.py --suite "$SUITE" --benchmark indoor --cache-dir "$CACHE_DIR" \
        --require-cached --seeds 0 --settings full:8 --data resident host \
        --variants '{"default": {}, "per_tensor": {"orthogonalize_impl": "per_tensor"}}' \
        --out "$OUT/job_timing_indoor.json" 2>&1 | tee "$OUT/job_timing.log" | tail -n 40
      keep "${PIPESTATUS[0]}" "job_timing" ;;
    probe)
      timeout 100 "$PYTHON" benchmarks/gpu_probe.py --suite "$SUITE" --benchmark indoor --steps 30 --batch-sizes 8 16 32 \
        --out "$OUT/probe_indoor.json" > "$OUT/probe.log" 2>&1
      keep $? "gpu_probe at the suite's size"
      timeout 80 "$PYTHON" benchmarks/gpu_probe.py --suite "$SUITE" --benchmark indoor --steps 30 --batch-sizes 8 16 32 \
        --height 144 --width 192 --out "$OUT/probe_indoor_144x192.json" >> "$OUT/probe.log" 2>&1
      keep $? "gpu_probe at 144x192"
      tail -n 5 "$OUT/probe.log" ;;
    *) echo "unknown stage $stage (tests, timing, probe)" >&2; exit 2 ;;
  esac
done
exit "$status"
