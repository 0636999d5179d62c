#!/usr/bin/env bash
# GPU benchmark for one prepared device call: Gemma-2B architecture (random weights), seq 128, bf16 weights
# with fp32 master weights, fused AdamW; samples/s and MFU. Writes $OUT/gpu_bench.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi || true
for batch in 8 32; do
  python bench/gpu_bench.py --device cuda --arch gemma-2b --batch "$batch" --seq 128 --steps 20 --warmup 5 \
    | tee "$out/gpu_bench_batch$batch.json"
done
