#!/usr/bin/env bash
# Every GPU measurement of the project in one call, for a session with one H100/H200 lent:
# the CUDA tests, the grouped-GEMM and MoE-layer benchmark (issue 5) and the training MFU table
# (issue 6). Results land in $OUT (or ./gpu_out) as the files committed under results/kernels/ and
# results/perf/; copy them there with the commit that made them.
#
# Prepare on the CPU box (the GPU box has no network), then run from the repository root there:
#   bash /work/shared/gpu/wheelhouse.sh          # deepspeed sdist + pydantic & co into .whl/
#   bash bench/gpu_session.sh [quick]            # `quick` skips the config sweep and the profiles
# About 8 min on an H100: ~2 min CUTLASS build (MAX_JOBS=16), ~1 min tests, ~5 min benchmarks.
# The 2-GPU loss check is separate: `python bench/multi_gpu.py prepare DIR` here, then
# `python bench/multi_gpu.py run DIR --out ...` on a 2-GPU machine.
set -euo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0  # 9.0 (not 9.0a): DeepSpeed's JIT parses it
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    .whl/deepspeed-*.tar.gz
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv | tee "$out/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt" || true

python3 -m kernels.cutlass_ext 2>&1 | tee "$out/cutlass_build.txt"
python3 -m pytest -q tests/test_kernels.py tests/test_moe.py 2>&1 | tee "$out/gpu_tests.txt"
python3 kernels/bench.py --out "$out/grouped_gemm_h100.csv" 2>&1 | tee "$out/kernels_bench.txt"
python3 bench/train_mfu.py --runs d512/dense,d512/moe_k1,d512/moe_k2 --variants torch:1,deepspeed:1 --batch 64 \
  --out "$out/train_mfu_h100.json" 2>&1 | tee "$out/train_mfu.txt"
if [ "${1:-}" != quick ]; then
  python3 kernels/bench.py --parts kinds --out "$out/grouped_gemm_kinds_h100.csv" 2>&1 | tail -5
  python3 kernels/profile_layer.py --backend cutlass --shape 0 > "$out/profile_moe_layer_h100.txt"
fi
