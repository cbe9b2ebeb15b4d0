#!/usr/bin/env bash
# On a lent GPU machine (no network, no snakemake/dvc/pydantic): install the carried wheels, then run the
# study's unfinished runs through snakemake and pack their records into $OUT (moe_study/remote/drive.py).
#   bash tools/gpu/run_study.sh STUDY.yaml [--runs a,b] [--budget-s 480] [--gpu-share S] ...
# WHEELS (default ./.whl, made by tools/gpu/wheelhouse.py) may hold the DeepSpeed sdist (--gpu-extras).
set -euo pipefail
study=$1; shift
wheels=${WHEELS:-.whl}
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
if compgen -G "$wheels/deepspeed-*.tar.gz" >/dev/null; then
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$wheels"/deepspeed-*.tar.gz
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
echo "run_study: wheels installed in $(( $(date +%s) - t0 )) s; snakemake $(snakemake --version)"
exec python3 -m moe_study.remote run "$study" --out "${OUT:?set OUT to the folder that comes back}" "$@"
