#!/usr/bin/env bash
# Issue 5's GPU measurements of the third session, in one device call (about 8 min on an H100):
# the CUDA tests, then the MoE layer (GPU-busy timing) with the fused router and combine variants,
# the router A/B, and a timeline profile. Results land in $OUT (or ./gpu_out).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bash bench/gpu_session.sh build > "$out/session.txt" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
t() { local limit=$1 log=$2; shift 2; echo "== $(date +%T) $*"; timeout "$limit" "$@" > "$out/$log" 2>&1; echo "rc=$?"; tail -2 "$out/$log"; }
t 240 gpu_tests.txt python3 -m pytest -q -x tests/test_router.py tests/test_moe_fused.py tests/test_kernels.py tests/test_moe.py
t 200 layer.txt python3 kernels/bench.py --timing busy --shapes 0,4,5 --parts layer --iters 20 \
  --layer-backends fused,fused:combine=atomic,fused:combine=unfused,cutlass,torch_grouped --out "$out/layer_busy_h100.csv"
t 100 layer_eager_router.txt python3 kernels/bench.py --timing busy --shapes 0,4 --parts layer --iters 20 --router eager \
  --layer-backends fused,cutlass --out "$out/layer_busy_eager_router_h100.csv"
t 60 profile.txt python3 kernels/profile_layer.py --backend fused --shape 0 --rows 25 --timeline
grep -h "^| layer" "$out"/layer_busy*_h100.md | cut -d'|' -f3-5,7,9,11
