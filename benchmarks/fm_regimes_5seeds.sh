#!/bin/bash
# Issue 42: the Fashion-MNIST protocol's README table under the regime rule of docs/regimes.md,
# every row in one window, 5 seeds each: the rows the rule changed with fine-tuning; SS-IL on
# tasks of 5 classes beside fine-tuning, iCaRL and LUCIR; WA's readings (clip x bias), chosen on
# validation; the rows the rule left alone (iCaRL, LUCIR, SIR, joint, MEMO; IL2M and ScaIL from
# fine-tuning's stored scores); the memory-free pair (fine-tuning and LwF with memory 0); the
# dynamic-architecture methods (DER, FOSTER, MEMO) with fine-tuning, memory-aligned.
# Resumable: run it again and every finished set is kept, an unfinished one resumed. Sets in
# order of need:
#   bash benchmarks/fm_regimes_5seeds.sh OUT_DIR            # then, e.g.:
#   cilkit compare OUT_DIR/rows/*/ --baseline finetune --regimes   (the rule trains methods differently)
#   cilkit compare OUT_DIR/ssil-b5/*/ --baseline finetune
#   python benchmarks/group_offset.py OUT_DIR/ssil-b5/main OUT_DIR/rows/ssil   # old vs new group
#   cat OUT_DIR/wa-tune/ranking.md                            # WA's reading chosen on validation
#   cilkit compare OUT_DIR/rows/finetune OUT_DIR/wa/*/ --baseline finetune --regimes
#   cilkit compare OUT_DIR/nomem/*/ --baseline finetune        # the memory-free protocol
#   cilkit compare OUT_DIR/aligned/*/ --baseline finetune       # model + exemplars in one budget
#   (IL2M and ScaIL: OUT_DIR/rows/finetune/run_*/calibrated/{il2m,scail}, one per seed)
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
# WA's readings: chosen on 500 held-out training images per class (3 seeds), never on test;
# a tune run again reads its finished points back and resumes an interrupted one
[ -f "$OUT/wa-tune/ranking.json" ] || python -m cilkit tune wa-fashion-mnist --set scenario.val_per_class=500 \
    --set runs=3 --set threads=1 --grid wa.clip=always,never --grid wa.bias=false,true --jobs 2 \
    --out "$OUT/wa-tune" > "$OUT/wa-tune.log" 2>&1
echo "wa-tune: exit $?"
# the paper's reading and PyCIL's first, then the two mixed ones
for reading in always-false never-true always-true never-false; do
  clip=${reading%-*} bias=${reading#*-}
  run_set "$OUT" wa/clip-$clip-bias-$bias wa-fashion-mnist --set wa.clip=$clip --set wa.bias=$bias "${CACHE[@]}"
done
# the rows the rule left alone, in the same window as the rows it changed
run_set "$OUT" rows/rest fashion-mnist --methods icarl,lucir,sir,joint "${CACHE[@]}"
run_set "$OUT" rows/memo memo-fashion-mnist "${CACHE[@]}"
for rectifier in il2m scail; do   # fine-tuning's training; scored from its stored test scores
  [ -d "$OUT/rows/finetune/run_4/calibrated/$rectifier" ] || python -m cilkit calibrate "$OUT/rows/finetune" \
      --with $rectifier > "$OUT/rows/finetune-$rectifier.log" 2>&1
  echo "calibrate $rectifier: exit $?"
done
run_set "$OUT" nomem/finetune fashion-mnist --set memory.total=0
run_set "$OUT" nomem/lwf lwf-fashion-mnist
# memory-aligned (Zhou et al., ICLR 2023): the model and the exemplars share fine-tuning's convnet
# after the last state (264,904 bytes) + 2000 images of 784 bytes, as benchmarks/fm_dynamic_5seeds.sh
for m in finetune der foster memo; do
  cfg=$m-fashion-mnist; [ $m = finetune ] && cfg=fashion-mnist
  run_set "$OUT" aligned/$m $cfg --set memory.total=null --set memory.budget_bytes=1832904 "${CACHE[@]}"
done
