#!/usr/bin/env bash
# GPU benchmark for one prepared device call: Gemma-2B architecture (random weights), seq 128, bf16 weights
# with fp32 master weights, fused AdamW; samples/s and MFU per shape. Writes $OUT/gpu_bench.jsonl when OUT
# is set (bench/results/gpu_bench.jsonl otherwise). A shape that fails (out of memory, say) is logged and
# the next one still runs. Then GRPO steps (bench/gpu_grpo.py) into $OUT/gpu_grpo.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run() {  # one shape in its own process, so an out-of-memory failure cannot poison the next
  echo "== $*"
  timeout 150 python3 bench/gpu_bench.py --device cuda --arch gemma-2b --seq 128 --steps 15 --warmup 3 "$@" \
    | python3 -c "import json,sys; print(json.dumps(json.loads(sys.stdin.read())))" >> "$out/gpu_bench.jsonl" \
    || echo "FAILED: $*"
  tail -n 1 "$out/gpu_bench.jsonl"
}
run --batch 1 --accum 4      # the old run's shape (batch 1 x grad-accum 4)
run --batch 8
run --batch 32
run --batch 16 --accum 4
run --batch 16 --accum 4 --compile
run --batch 32 --compile
run --batch 32 --accum 4 --compile   # accumulation amortises the optimizer step (about 45 ms over 2.5B fp32 params)
run --batch 16 --accum 8 --compile
echo "== profile of one step, batch 16 (top CUDA kernels) -> $out/gpu_profile.txt"
timeout 150 python3 bench/gpu_bench.py --device cuda --arch gemma-2b --seq 128 --batch 16 --steps 2 --warmup 2 \
  --profile 2> "$out/gpu_profile.txt" > /dev/null || echo "FAILED: profile"
echo "== GRPO steps, Gemma-2B shape: completions generated and trained per second -> $out/gpu_grpo.jsonl"
for shape in "--prompts 16 --group 8 --tokens 128" "--prompts 32 --group 8 --tokens 256 --micro-batch 32"; do
  timeout 240 python3 bench/gpu_grpo.py --device cuda --arch gemma-2b --steps 3 $shape \
    | python3 -c "import json,sys; t=sys.stdin.read(); print(json.dumps(json.loads(t[t.index('{'):])))" \
    >> "$out/gpu_grpo.jsonl" || echo "FAILED: grpo $shape"
  tail -n 1 "$out/gpu_grpo.jsonl"
done
