#!/usr/bin/env bash
# Most-influential-subset removal on the built-in MATH-style task: for each query, retrain from the base
# without a method's top-k, and measure the query's loss and task success (greedy generation checked by
# math_task.check_math) against removing k random examples.
# Tiny CPU: bash recipes/math_removal.sh
# GPU: MODEL=/models/Qwen2.5-0.5B-Instruct CONFIGS=configs OUT=/data/math_removal bash recipes/math_removal.sh
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-/tmp/llm_attr_math_removal}
N_TRAIN=${N_TRAIN:-96}; N_QUERY=${N_QUERY:-4}; K=${K:-4,8,16}
mkdir -p "$OUT/scores"

step "data and the target"
python -m llm_attr data make math --n "$N_TRAIN" --seed 0 --out "$OUT/train.jsonl"
python -m llm_attr data make math --n "$((N_TRAIN + N_QUERY))" --seed 0 --out "$OUT/all.jsonl"
tail -n "$N_QUERY" "$OUT/all.jsonl" > "$OUT/query.jsonl"
$LAUNCH finetune --model "$MODEL" --train "$OUT/train.jsonl" --out "$OUT/target" --config "$CONFIGS/math_target.yaml"

step "methods"
$LAUNCH daunce --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/daunce" "${DAUNCE_ARGS[@]}"
$LAUNCH gradients --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/gradients" "${GRAD_ARGS[@]}"
python -m llm_attr query "$OUT/gradients" --method grad-dot --query "$OUT/query.jsonl" --out "$OUT/scores/grad-dot"

step "removal of each query's top-k, retraining from the base (the target's config)"
python -m llm_attr eval removal --scores "$OUT/daunce" "$OUT/scores/grad-dot" --train "$OUT/train.jsonl" \
    --query "$OUT/query.jsonl" --target "$OUT/target" --k "$K" --config "$CONFIGS/removal.yaml" \
    --out "$OUT/eval/removal.json"
python -m llm_attr report "$OUT/eval" --out "$OUT/report"
