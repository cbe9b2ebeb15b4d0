#!/usr/bin/env bash
# Every GPU measurement of the project in one call, for a session with one H100/H200 lent: the CUDA
# tests, the grouped-GEMM / MoE-layer benchmark (issue 5) and the training MFU table (issue 6).
# Results land in $OUT (or ./gpu_out), named as the files committed under results/kernels/ and
# results/perf/; copy them there with the commit that made them.
#
# Prepare on the CPU box (the GPU box has no network), then run from the repository root there:
#   bash /work/shared/gpu/wheelhouse.sh          # deepspeed sdist + pydantic & co into .whl/
#   bash bench/gpu_session.sh [STEPS|all]        # STEPS: comma list of build,tests,kernels,layers,mfu_moe,
#                                                # mfu_dense (default all); each step has its own time limit
# About 9 min on an H100 for `all`: ~2 min CUTLASS build (MAX_JOBS=16), ~1 min tests, ~2 min kernel
# benchmark (Triton autotuning included), ~4 min training MFU (torch.compile included).
# The 2-GPU loss check is separate: `python bench/multi_gpu.py prepare DIR` here, then
# `python bench/multi_gpu.py run DIR --out ...` on a 2-GPU machine.
set -uo pipefail
out=${OUT:-gpu_out}
what=${1:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0  # 9.0 (not 9.0a): DeepSpeed's JIT parses it
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if [[ "$what" == all || "$what" == *mfu* ]]; then
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
      .whl/deepspeed-*.tar.gz
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step() {  # step SECONDS LOGNAME CMD...: run with a time limit, keep its log in $out
  local limit=$1 log=$2; shift 2
  echo "== $(date +%T) $*"
  timeout "$limit" "$@" > "$out/$log" 2>&1; echo "rc=$? ($log)"; tail -3 "$out/$log"
}
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv | tee "$out/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt" || true

has() { [ "$what" = all ] || [[ ",$what," == *",$1,"* ]]; }
has build && step 240 cutlass_build.txt python3 -m kernels.cutlass_ext
has tests && step 150 gpu_tests.txt python3 -m pytest -q tests/test_moe_fused.py tests/test_kernels.py tests/test_moe.py
has kernels && step 240 kernels_bench.txt python3 bench/kernels_bench.py --shapes 0,4,5 --no-loop --iters 20 \
  --layer-backends fused,fused:gather,cutlass,torch_grouped --out "$out/grouped_gemm_h100.csv"
has layers && step 200 layers_bench.txt python3 bench/kernels_bench.py --shapes 0,4 --parts layer --compile --iters 20 \
  --layer-backends fused,fused:gather,cutlass,torch_grouped --out "$out/moe_layer_compiled_h100.csv"
has mfu_moe && step 240 train_mfu_moe.txt python3 bench/train_mfu.py --batch 64 --runs d512/moe_k1 \
  --variants torch:1 --expert-backend fused --out "$out/train_mfu_moe_fused_h100.json" && \
  step 150 train_mfu_moe2.txt python3 bench/train_mfu.py --batch 64 --runs d512/moe_k1 \
  --variants torch:1 --expert-backend torch_grouped --out "$out/train_mfu_moe_torch_h100.json"
has mfu_dense && step 300 train_mfu_dense.txt python3 bench/train_mfu.py --batch 64 \
  --runs d512/dense,d1024/dense --variants torch:1,deepspeed:1 --out "$out/train_mfu_dense_h100.json"
