#!/usr/bin/env bash
# Issue 5's GPU measurements of the third session, in one device call (about 8 min on an H100):
# the CUDA tests, then the MoE layer (GPU-busy timing) with the fused router and combine variants,
# the router A/B, and a timeline profile. Results land in $OUT (or ./gpu_out).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
logs=/tmp/issue5_logs; mkdir -p $logs  # at most 8 files come back: logs go to one $out/log.txt
OUT=$logs bash bench/gpu_session.sh build > "$logs/session.txt" 2>&1; cat $logs/device.txt $logs/cutlass_build.txt >> "$out/log.txt"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
t() { local limit=$1 log=$2; shift 2; echo "== $(date +%T) $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" > "$logs/$log" 2>&1; echo "rc=$?" | tee -a "$out/log.txt"; tail -40 "$logs/$log" >> "$out/log.txt"; tail -2 "$logs/$log"; }
t 240 gpu_tests.txt python3 -m pytest -q --maxfail=5 tests/test_router.py tests/test_moe_fused.py tests/test_kernels.py tests/test_moe.py
t 200 layer.txt python3 kernels/bench.py --timing busy --shapes 0,4,5 --parts layer --iters 20 \
  --layer-backends fused,fused:combine=atomic,fused:combine=unfused,cutlass,torch_grouped --out "$out/layer_busy_h100.csv"
t 100 layer_eager_router.txt python3 kernels/bench.py --timing busy --shapes 0,4 --parts layer --iters 20 --router eager \
  --layer-backends fused,cutlass --out "$out/layer_busy_eager_router_h100.csv"
t 60 profile.txt python3 kernels/profile_layer.py --backend fused --shape 0 --rows 25 --timeline
cp $logs/profile.txt "$out/profile_fused_shape0.txt"
grep -h "^| layer" "$out"/layer_busy*_h100.md | cut -d'|' -f3-5,7,9,11
