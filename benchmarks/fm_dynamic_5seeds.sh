#!/bin/bash
# Issue 39 item 7: the Fashion-MNIST protocol's 5-seed table for the dynamic-architecture methods.
# finetune, der, foster, memo (each with its configs/<method>-fashion-mnist.yaml), 5 seeds each,
# with exemplars alone (memory.total 2000) and memory-aligned (memory.budget_bytes = fine-tuning's
# convnet after the last state, 264,904 bytes, + 2000 images of 784 bytes: the model and the
# exemplars share what fine-tuning uses), two runs at a time, one thread each. Resumable: run it
# again and every finished comparison is kept, an unfinished one resumed (--resume).
#   bash benchmarks/fm_dynamic_5seeds.sh OUT_DIR            # then:
#   cilkit compare OUT_DIR/ex/* --baseline finetune       # and OUT_DIR/aligned/*
set -u
OUT=${1:?usage: bash benchmarks/fm_dynamic_5seeds.sh OUT_DIR}
source "$(dirname "$0")/fm_sets.sh"
BUDGET=1832904
CACHE=(--set state0_cache="$OUT/cache")
for cfg in fashion-mnist der-fashion-mnist foster-fashion-mnist memo-fashion-mnist; do
  run_set "$OUT" ex/$cfg $cfg "${CACHE[@]}"
  run_set "$OUT" aligned/$cfg $cfg --set memory.total=null --set memory.budget_bytes=$BUDGET "${CACHE[@]}"
done
