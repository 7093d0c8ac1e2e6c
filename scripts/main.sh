#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch and verify MNIST, train the paper's
# CapsNet briefly (preset "quick": minutes on a 2-core CPU), test it, draw the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/capsnet data mnist
.venv/bin/capsnet train --preset quick --run-dir "runs/quick-$(date +%Y%m%d-%H%M%S)" --figures "$@"
