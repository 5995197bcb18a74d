#!/usr/bin/env bash
# Agreement of attribution methods with the further-training reference, against the further-training budget
# (the final-model-only paper's study; docs/design.md, Further training). Tiny CPU version: bash recipes/further_training.sh
# GPU: MODEL=/models/Qwen2.5-0.5B-Instruct CONFIGS=configs OUT=/data/ft bash recipes/further_training.sh
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-/tmp/llm_attr_further_training}
N_TRAIN=${N_TRAIN:-64}; N_QUERY=${N_QUERY:-8}
mkdir -p "$OUT/scores"

step "data: $N_TRAIN MATH-style training records, $N_QUERY held-out queries"
python -m llm_attr data make math --n "$N_TRAIN" --seed 0 --out "$OUT/train.jsonl"
python -m llm_attr data make math --n "$((N_TRAIN + N_QUERY))" --seed 0 --out "$OUT/all.jsonl"
tail -n "$N_QUERY" "$OUT/all.jsonl" > "$OUT/query.jsonl"

step "the final model: fine-tune $MODEL"
$LAUNCH finetune --model "$MODEL" --train "$OUT/train.jsonl" --out "$OUT/target" --config "$CONFIGS/finetune.yaml"

step "further-training references (seeds x left-out examples, budget grid): SGD (the config), then Adam"
$LAUNCH further-train --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/reference" --config "$CONFIGS/further_training.yaml"
$LAUNCH further-train --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/reference_adam" --config "$CONFIGS/further_training.yaml" \
    --set optimizer=adamw --set learning_rate=1e-3 --set "budgets=${ADAM_BUDGETS:-[8,64,256]}"

step "methods: Daunce, projected gradients (one featurization, several scorers)"
$LAUNCH daunce --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/daunce" "${DAUNCE_ARGS[@]}"
$LAUNCH gradients --model "$OUT/target" --train "$OUT/train.jsonl" --query "$OUT/query.jsonl" \
    --out "$OUT/gradients" "${GRAD_ARGS[@]}"
for m in grad-dot grad-cos if-fisher if-ekfac; do
  python -m llm_attr query "$OUT/gradients" --method "$m" --query "$OUT/query.jsonl" --out "$OUT/scores/$m"
done

step "compare with the reference, per budget"
for ref in reference reference_adam; do
  python -m llm_attr eval compare --reference "$OUT/$ref" --method "$OUT/daunce" "$OUT"/scores/*
done
python -m llm_attr report "$OUT/reference" "$OUT/reference_adam" --out "$OUT/report"
