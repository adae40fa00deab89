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
BUDGET=1832904
mkdir -p "$OUT/ex" "$OUT/aligned"
for cfg in fashion-mnist der-fashion-mnist foster-fashion-mnist memo-fashion-mnist; do
  for acc in ex aligned; do
    out=$OUT/$acc/$cfg
    [ -f "$out/summary.json" ] && continue
    if [ -d "$out" ]; then
      python -m cilkit run --resume "$out" --jobs 2 >> "$out.log" 2>&1
    else
      extra=()
      [ $acc = aligned ] && extra=(--set memory.total=null --set memory.budget_bytes=$BUDGET)
      python -m cilkit run $cfg --set runs=5 --set threads=1 --set state0_cache="$OUT/cache" "${extra[@]}" \
          --jobs 2 --out "$out" > "$out.log" 2>&1
    fi
    echo "$acc $cfg: exit $?"
  done
done
