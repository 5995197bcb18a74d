#!/usr/bin/env bash
# Most-influential-subset removal on the built-in IFEVAL-style task (ifeval_task.check_ifeval); see recipes/_removal.sh.
# Tiny CPU: bash recipes/ifeval_removal.sh
# GPU: MODEL=/models/Qwen2.5-0.5B-Instruct CONFIGS=configs OUT=/data/ifeval_removal bash recipes/ifeval_removal.sh
TASK=ifeval
source "$(dirname "$0")/_removal.sh"
