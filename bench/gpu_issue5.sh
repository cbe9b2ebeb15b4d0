#!/usr/bin/env bash
# Issue 5's GPU measurements of the third session, each set in one device call on an H100:
#   bash bench/gpu_issue5.sh variants   (~8 min) the router and fused-block GPU tests; the MoE layer
#                                        (GPU-busy timing) with the fused router and the combine
#                                        variants; the router A/B; a timeline profile (run at fd628d0)
#   bash bench/gpu_issue5.sh final      (~5 min) the router, kernel and layer GPU tests; the MoE layer
#                                        with the final defaults (run at de7b2b4, with a counting-sort
#                                        route A/B since removed: measured slower)
# Results land in $OUT (or ./gpu_out); at most 8 files come back from a device call, so the logs of
# all steps are collected in one $OUT/log.txt.
set -uo pipefail
what=${1:-final}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
logs=/tmp/issue5_logs; mkdir -p $logs
OUT=$logs bash bench/gpu_session.sh build > "$logs/session.txt" 2>&1; cat $logs/device.txt $logs/cutlass_build.txt >> "$out/log.txt"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
t() { local limit=$1 log=$2; shift 2; echo "== $(date +%T) $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" > "$logs/$log" 2>&1; echo "rc=$?" | tee -a "$out/log.txt"; tail -40 "$logs/$log" >> "$out/log.txt"; tail -3 "$logs/$log"; }
if [ "$what" = variants ]; then
  t 240 gpu_tests.txt python3 -m pytest -q --maxfail=5 tests/test_router.py tests/test_moe_fused.py tests/test_kernels.py tests/test_moe.py
  t 200 layer.txt python3 bench/kernels_bench.py --timing busy --shapes 0,4,5 --parts layer --iters 20 \
    --layer-backends fused,fused:combine=atomic,fused:combine=slots,cutlass,torch_grouped --out "$out/layer_busy_h100.csv"
  t 100 layer_eager_router.txt python3 bench/kernels_bench.py --timing busy --shapes 0,4 --parts layer --iters 20 --router eager \
    --layer-backends fused,cutlass --out "$out/layer_busy_eager_router_h100.csv"
  t 60 profile.txt python3 bench/profile_layer.py --backend fused --shape 0 --rows 25 --timeline
  cp $logs/profile.txt "$out/profile_fused_shape0.txt"
else
  t 120 gpu_tests_router.txt python3 -m pytest -q -rf tests/test_router.py -k gpu
  t 150 gpu_tests.txt python3 -m pytest -q -rf tests/test_kernels.py tests/test_moe.py
  t 150 layer.txt python3 bench/kernels_bench.py --timing busy --shapes 0,4,5 --parts layer --iters 20 \
    --layer-backends fused,cutlass,torch_grouped --out "$out/layer_final_busy_h100.csv"
fi
grep -h "^| layer" "$out"/layer_*_h100.md | cut -d'|' -f3-5,7,9,11
