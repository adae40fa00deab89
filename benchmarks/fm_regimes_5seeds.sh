#!/bin/bash
# Issue 42: the Fashion-MNIST protocol's rows whose configs the regime rule of docs/regimes.md
# changed, with fine-tuning in the same window, 5 seeds each; SS-IL on tasks of 5 classes beside
# fine-tuning, iCaRL and LUCIR; WA's readings (clip x bias). Resumable: run it again and every
# finished set is kept, an unfinished one resumed. Sets in order of need:
#   bash benchmarks/fm_regimes_5seeds.sh OUT_DIR            # then, e.g.:
#   cilkit compare OUT_DIR/rows/* --baseline finetune
#   cilkit compare OUT_DIR/ssil-b5/* --baseline finetune
#   python benchmarks/group_offset.py OUT_DIR/ssil-b5/main OUT_DIR/rows/ssil   # old vs new group
#   cilkit compare OUT_DIR/wa/* --baseline finetune           # with OUT_DIR/rows/finetune
set -u
OUT=${1:?usage: bash benchmarks/fm_regimes_5seeds.sh OUT_DIR}
source "$(dirname "$0")/fm_sets.sh"
CACHE=(--set state0_cache="$OUT/cache")
run_set "$OUT" rows/finetune fashion-mnist "${CACHE[@]}"
run_set "$OUT" rows/gdumb gdumb-fashion-mnist
run_set "$OUT" rows/podnet podnet-fashion-mnist "${CACHE[@]}"
run_set "$OUT" rows/eeil eeil-fashion-mnist "${CACHE[@]}"
run_set "$OUT" rows/bic fashion-mnist --set method=bic "${CACHE[@]}"
run_set "$OUT" ssil-b5/main fashion-mnist-b5-1step --methods finetune,icarl,lucir,ssil "${CACHE[@]}"
run_set "$OUT" rows/ssil ssil-fashion-mnist "${CACHE[@]}"     # unchanged by the rule: its stored scores
run_set "$OUT" rows/der der-fashion-mnist "${CACHE[@]}"
run_set "$OUT" rows/foster foster-fashion-mnist "${CACHE[@]}"
for clip in always never; do
  for bias in false true; do
    run_set "$OUT" wa/clip-$clip-bias-$bias wa-fashion-mnist --set wa.clip=$clip --set wa.bias=$bias "${CACHE[@]}"
  done
done
