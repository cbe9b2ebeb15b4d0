#!/usr/bin/env bash
# The third session's closing issue-5 GPU call (about 6 min on an H100): the GPU tests not yet run
# at this code (router, kernels, layer), then the MoE layer with the final defaults (fused router,
# fused backend without the combine epilogue). Its counting-sort route A/B (--route count) was
# measured slower than the argsort and the route removed from the code, so that call is gone.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
logs=/tmp/issue5_logs; mkdir -p $logs  # at most 8 files come back: logs go to one $out/log.txt
OUT=$logs bash bench/gpu_session.sh build > "$logs/session.txt" 2>&1; cat $logs/device.txt $logs/cutlass_build.txt >> "$out/log.txt"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
t() { local limit=$1 log=$2; shift 2; echo "== $(date +%T) $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" > "$logs/$log" 2>&1; echo "rc=$?" | tee -a "$out/log.txt"; tail -40 "$logs/$log" >> "$out/log.txt"; tail -3 "$logs/$log"; }
t 120 gpu_tests_router.txt python3 -m pytest -q -rf tests/test_router.py -k gpu
t 150 gpu_tests.txt python3 -m pytest -q -rf tests/test_kernels.py tests/test_moe.py
t 150 layer.txt python3 kernels/bench.py --timing busy --shapes 0,4,5 --parts layer --iters 20 \
  --layer-backends fused,cutlass,torch_grouped --out "$out/layer_final_busy_h100.csv"
grep -h "^| layer" "$out"/layer_final*_h100.md | cut -d'|' -f3-5,7,9,11
