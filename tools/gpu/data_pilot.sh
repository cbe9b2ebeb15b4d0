#!/usr/bin/env bash
# The first loan of a study whose corpus is the GPU machine's own packages (studies/gpu_study.yaml): read
# what is installed there, pin the study's corpus versions to it, and time the data stages on that machine.
# Run from a synced copy (tools/gpu/sync.sh) on the lent machine; everything it learns lands in $OUT:
#   corpus_listing.{txt,json}  what bench/gpu_corpus_listing.py read there
#   gpu_study.yaml             the study file with its versions pinned (commit it at home)
#   data_pilot.log             each data stage's wall time and log
#   data_pilot.tar.gz          work/metrics/*.json and the trained tokenizer.json (commit the tokenizer and
#                              point tokenizer.path at it to pin the tokenization across loans)
#   bash tools/gpu/data_pilot.sh studies/gpu_study.yaml [STAGE_BUDGET_S]
set -uo pipefail
study=$1; budget=${2:-420}
wheels=${WHEELS:-.whl}
: "${OUT:?set OUT to the folder that comes back}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
log=$OUT/data_pilot.log
python3 bench/gpu_corpus_listing.py --json "$OUT/corpus_listing.json" > "$OUT/corpus_listing.txt" || exit 1
python3 tools/gpu/pin_corpus_versions.py "$study" "$OUT/corpus_listing.json" | tee -a "$log" || exit 1
cp "$study" "$OUT/$(basename "$study")"
python3 -m moe_study.config.load --expand "$study" > params.yaml || exit 1
t_end=$(( $(date +%s) + budget ))
for stage in corpus tokenize dedupe split tasks; do
  left=$(( t_end - $(date +%s) ))
  [ "$left" -gt 5 ] || { echo "data_pilot: no time left for $stage" | tee -a "$log"; break; }
  t0=$(date +%s.%N)
  timeout "$left" python3 -m stages.$stage >> "$log" 2>&1; rc=$?
  echo "data_pilot: stage $stage rc=$rc wall $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s" | tee -a "$log"
  [ "$rc" -eq 0 ] || break
done
tar -czf "$OUT/data_pilot.tar.gz" work/metrics $(ls work/tokens/tokenizer.json 2>/dev/null) 2>/dev/null
ls -la work/tokens work/dedupe work/split 2>/dev/null | tee -a "$log"
