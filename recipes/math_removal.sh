#!/usr/bin/env bash
# Most-influential-subset removal on the built-in MATH-style task (math_task.check_math); see recipes/_removal.sh.
# Tiny CPU: bash recipes/math_removal.sh
# GPU: MODEL=/models/Qwen2.5-0.5B-Instruct CONFIGS=configs OUT=/data/math_removal bash recipes/math_removal.sh
TASK=math
source "$(dirname "$0")/_removal.sh"
