#!/usr/bin/env bash
# Everything that needs a GPU, in one go (CI has none): the CUDA tests, then the benchmarks at the
# 1B size, with logs and the JSON figures under OUTDIR.
#
#   bash benchmarks/gpu.sh [OUTDIR]                      (default: runs/gpu)
#   ONLY=lora_step,qlora_step bash benchmarks/gpu.sh     (a subset of benchmark groups)
#   SKIP_TESTS=1 bash benchmarks/gpu.sh                  (benchmarks only)
#
# Needs CUDA, Triton, peft and bitsandbytes importable. On an H100 the tests take ~2 minutes and
# all benchmark groups ~9 (2026-11-23), so a machine lent by the 10-minute command splits them.
set -u
out=${1:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  "$python" -m pytest -q -p no:cacheprovider -rsx tests/test_cuda.py tests/quant/test_triton.py 2>&1 \
    | tee "$out/tests.txt"
  status=${PIPESTATUS[0]}
fi
"$python" -m benchmarks.run --device cuda --size 1b ${ONLY:+--only "$ONLY"} --json "$out/bench.json" \
  --markdown 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
exit $(( status != 0 || bench != 0 ))
