# Shared by recipes/*.sh: the launcher, the model, and the built-in target. Source it; do not run it.
# Environment knobs (all optional):
#   OUT=dir            where everything goes (default /tmp/llm_attr_<recipe>)
#   MODEL=spec         base model (default builtin:tiny; e.g. builtin:smollm2-135m or a Qwen2.5-0.5B directory)
#   CONFIGS=dir        config set: configs/tiny (CPU, minutes) or configs (real models on a GPU)
#   NPROC=n            accelerate processes (default 2); LAUNCH overrides the whole launcher
set -euo pipefail
export LLM_ATTR_PROGRESS=${LLM_ATTR_PROGRESS:-0}
MODEL=${MODEL:-builtin:tiny}
CONFIGS=${CONFIGS:-configs/tiny}
NPROC=${NPROC:-2}
LAUNCH=${LAUNCH:-"accelerate launch --multi_gpu --num_processes $NPROC --num_machines 1 --mixed_precision no --dynamo_backend no -m llm_attr"}
if [[ "$NPROC" == 1 ]]; then LAUNCH="python -m llm_attr"; fi
# The methods' own configs are used as they are; the tiny set only overrides a few keys (so it never goes stale).
DAUNCE_ARGS=(--config configs/daunce.yaml)
GRAD_ARGS=(--config configs/gradients.yaml)
if [[ "$CONFIGS" == configs/tiny ]]; then
  DAUNCE_ARGS+=(--set perturbations=16 --set keep_adapters=false --set max_length=384)
  GRAD_ARGS+=(--set max_length=384)
fi
step() { echo; echo "== $*"; }
