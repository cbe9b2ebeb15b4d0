#!/usr/bin/env bash
# The speed-defaults measurements of results/perf/study_step_h200.md ("Defaults from measurements"), on one GPU.
# Run from a copy of this tree (cwd) whose data stages for bench/speed_defaults_smoke.yaml have run; BEFORE: a
# checkout of the commit to compare with (its bench/study_step.py; BEFORE_PYTHONPATH its PYTHONPATH). Writes into
# $OUT. bench/speed_defaults_smoke.json: the yaml as JSON, for an image without PyYAML.
set -u
BEFORE=${BEFORE:-}
S="--steps 15 --warmup 6"
python bench/study_step.py $S --runs r10,r20,dense --variants auto:auto:auto,torch_grouped:default:1 \
    --profile "r10@auto:auto:auto" --out "$OUT/after.jsonl" > "$OUT/after.log" 2>&1
if [ -n "$BEFORE" ]; then
    (cd "$BEFORE" && PYTHONPATH=${BEFORE_PYTHONPATH:-} GIT_COMMIT=$BEFORE_COMMIT python bench/study_step.py $S --runs r10,r20,dense \
        --variants torch_grouped:default:1 --profile "r10@torch_grouped:default:1" --out "$OUT/before.jsonl") \
        > "$OUT/before.log" 2>&1
fi
python bench/speed_defaults_smoke.py bench/speed_defaults_smoke.json dense r10 > "$OUT/smoke.jsonl" 2> "$OUT/smoke.log"
cp work/runs/r10/train.json "$OUT/r10_train.json" 2>/dev/null
python -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_train_step.py tests/test_router.py \
    -k "speed or cuda_graph or top1" \
    > "$OUT/tests.log" 2>&1
tail -3 "$OUT"/*.log
