# Shared by recipes/math_removal.sh and recipes/ifeval_removal.sh (TASK=math|ifeval): most-influential-subset
# removal. For each query, remove its top-k training examples by each method, retrain from the base with the
# target's config, and measure the query's loss and task success (math_task.check_math or
# ifeval_task.check_ifeval) against removing k random examples. Source it with TASK set; do not run it.
: "${TASK:?set TASK=math or TASK=ifeval}"
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-/tmp/llm_attr_${TASK}_removal}
N_TRAIN=${N_TRAIN:-96}; N_QUERY=${N_QUERY:-4}; K=${K:-4,8,16}
mkdir -p "$OUT/scores"

step "data and the target"
python -m llm_attr data make "$TASK" --n "$N_TRAIN" --seed 0 --out "$OUT/train.jsonl"
python -m llm_attr data make "$TASK" --n "$((N_TRAIN + N_QUERY))" --seed 0 --out "$OUT/all.jsonl"
tail -n "$N_QUERY" "$OUT/all.jsonl" > "$OUT/query.jsonl"
$LAUNCH finetune --model "$MODEL" --train "$OUT/train.jsonl" --out "$OUT/target" --config "$CONFIGS/${TASK}_target.yaml"

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
