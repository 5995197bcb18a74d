#!/usr/bin/env bash
# LDS of Daunce and the gradient methods with 95% CIs and a random-score baseline (docs/design.md, Evaluation).
# Tiny CPU version: bash recipes/lds.sh      from the final model instead of the base: FROM=final bash recipes/lds.sh
# GPU: MODEL=/models/Qwen2.5-0.5B-Instruct CONFIGS=configs OUT=/data/lds bash recipes/lds.sh
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-/tmp/llm_attr_lds}
FROM=${FROM:-base}
N_TRAIN=${N_TRAIN:-64}; N_QUERY=${N_QUERY:-16}
mkdir -p "$OUT/scores"

step "data and the target"
python -m llm_attr data make math --n "$N_TRAIN" --seed 0 --out "$OUT/train.jsonl"
python -m llm_attr data make math --n "$((N_TRAIN + N_QUERY))" --seed 0 --out "$OUT/all.jsonl"
tail -n "$N_QUERY" "$OUT/all.jsonl" > "$OUT/query.jsonl"
$LAUNCH finetune --model "$MODEL" --train "$OUT/train.jsonl" --out "$OUT/target" --config "$CONFIGS/finetune.yaml"

step "ground truth: retrain on M random halves (from=$FROM), query losses cached in a store"
$LAUNCH retrain --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/ground_truth" --config "$CONFIGS/retrain.yaml" --set "from=$FROM"

step "methods"
$LAUNCH daunce --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/daunce" "${DAUNCE_ARGS[@]}"
$LAUNCH gradients --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/gradients" "${GRAD_ARGS[@]}"
for m in grad-dot grad-cos if-ekfac; do
  python -m llm_attr query "$OUT/gradients" --method "$m" --query "$OUT/query.jsonl" --out "$OUT/scores/$m"
done

step "LDS"
python -m llm_attr eval lds --ground-truth "$OUT/ground_truth" --scores "$OUT/daunce" "$OUT"/scores/*
python -m llm_attr report "$OUT/ground_truth" --out "$OUT/report"
