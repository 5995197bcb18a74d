#!/usr/bin/env bash
# Peer libraries for `python benchmarks/run.py --sections peers` (benchmark-only: never dependencies of llm_attr).
#   Kronfluence 1.0.1: EK-FAC on the same LoRA modules (its helpers einops, einconv, opt-einsum come with [bench]);
#   dattri 0.3.0: its `dattri.metric.lds` recomputes our LDS figures as a cross-check.
# Both are installed without their dependencies, so nothing replaces the torch build already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -e '.[bench]'
pip install --no-deps kronfluence==1.0.1 dattri==0.3.0
python -c "import kronfluence, dattri.metric; print('peers ready: kronfluence', kronfluence.__version__)"
