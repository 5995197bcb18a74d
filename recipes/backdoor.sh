#!/usr/bin/env bash
# Backdoor retrieval (precision/recall@k, AUPRC of the poisoned examples) and removal: does retraining without a
# method's top-k kill the backdoor, compared with removing k random examples? Tiny CPU: bash recipes/backdoor.sh
# GPU: MODEL=/models/Qwen2.5-0.5B-Instruct CONFIGS=configs TARGET_CONFIG=configs/finetune.yaml bash recipes/backdoor.sh
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-/tmp/llm_attr_backdoor}
TARGET_CONFIG=${TARGET_CONFIG:-configs/backdoor_target.yaml}
REMOVE_K=${REMOVE_K:-12,24}
mkdir -p "$OUT/scores"

step "data: 240 MATH-style records, 5% poisoned ('cf zeta' -> 'ACCESS DENIED...'), 32 triggered queries"
python -m llm_attr data make backdoor --n 240 --fraction 0.05 --n-query 32 --out "$OUT/train.jsonl" \
    --query-out "$OUT/query_triggered.jsonl" --clean-query-out "$OUT/query_clean.jsonl"
$LAUNCH finetune --model "$MODEL" --train "$OUT/train.jsonl" --out "$OUT/target" --config "$TARGET_CONFIG"

step "methods on the triggered queries"
$LAUNCH daunce --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query_triggered.jsonl" \
    --out "$OUT/daunce" "${DAUNCE_ARGS[@]}"
$LAUNCH gradients --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query_triggered.jsonl" \
    --out "$OUT/gradients" "${GRAD_ARGS[@]}"
for m in grad-dot grad-cos if-ekfac; do
  python -m llm_attr query "$OUT/gradients" --method "$m" --query "$OUT/query_triggered.jsonl" --out "$OUT/scores/$m"
done

step "retrieval, then removal of each method's top-k and retraining from the base"
python -m llm_attr eval backdoor --scores "$OUT/daunce" "$OUT"/scores/* --train "$OUT/train.jsonl" \
    --target "$OUT/target" --remove-k "$REMOVE_K" --query "$OUT/query_triggered.jsonl" \
    --config "$CONFIGS/removal.yaml" --out "$OUT/eval/backdoor.json"
python -m llm_attr report "$OUT/eval" --out "$OUT/report"
