#!/usr/bin/env bash
# The measurements committed under results/kernels/ (grouped_gemm_h100.*) and results/perf/
# (train_mfu_moe_h100.jsonl, profile) in one device call; run from the repository root on the GPU
# machine after the wheel install of bench/gpu_session.sh (needs .whl/).
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"; log="$out/log.txt"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv >> "$log"
python3 -m kernels.cutlass_ext >> "$log" 2>&1
timeout 240 python3 bench/kernels_bench.py --shapes 0,4,5 --no-loop --iters 20 \
  --layer-backends fused,fused:gather,cutlass,torch_grouped --out "$out/grouped_gemm_h100.csv" >> "$log" 2>&1
echo "bench rc=$?" | tee -a "$log"
for spec in "fused default" "fused reduce-overhead" "torch_grouped default"; do
  set -- $spec
  mode=(); [ "$2" != default ] && mode=(--compile-mode "$2")
  timeout 100 python3 bench/train_mfu.py --batch 64 --runs d512/moe_k1 --variants torch:1 --expert-backend "$1" \
    "${mode[@]}" --out "/tmp/mfu_$1_$2.json" 2>>"$log" | grep '^{' >> "$out/train_mfu_moe_h100.jsonl"
  echo "mfu $spec rc=$?" | tee -a "$log"
done
timeout 100 python3 bench/train_mfu.py --batch 64 --runs d512/moe_k1 --variants torch:1 --expert-backend fused \
  --steps 3 --out /tmp/prof/p.json --profile d512/moe_k1:torch:1 2>>"$log" | grep '^{' | tail -1 >> "$out/train_mfu_moe_h100.jsonl"
cp /tmp/prof/profile_*.txt "$out/" 2>/dev/null
tail -5 "$log"
