#!/usr/bin/env bash
# Reproduce every GPU figure of docs/RESULTS.md and docs/PERFORMANCE.md on one CUDA GPU (the
# records came from an NVIDIA H200; an H100 or any other CUDA GPU will do) within a time budget:
#
#   bash scripts/reproduce_gpu.sh --budget 90m --out gpu-results [--data-dir DIR]
#   bash scripts/reproduce_gpu.sh --budget 10m --out OUT --tiny DATA   (every step on the CPU,
#                                                                        tiny: tests/test_reproduce.py)
#
# How the budget is spent (the numbers are at the top of scripts/reproduce_gpu.py):
#   1. the benches, one at a time, alone on the GPU (timings need it alone), each stopped after
#      2 minutes: about 5 minutes in all;
#   2. 60% of the time then left: the MNIST and Fashion-MNIST runs and the affine experiment,
#      six at a time in three waves; time a wave does not use goes to the next; the affine
#      experiment trains CapsNet and the CNN to the same validation accuracy (--stop-at 0.992);
#   3. half of what is left: the other routings (Efficient-CapsNet and both EM networks, each
#      on its preset, on MNIST and Fashion-MNIST), six at a time;
#   4. everything left: MultiMNIST, alone, for up to 100 epochs.
# Each run's --time-limit leaves a minute for its start-up and test, and a run still going when
# the budget ends is stopped: the script ends inside its budget. 45 minutes lets every MNIST run
# of step 2 train all its epochs (Efficient-CapsNet's 150 epochs and EM routing need hours);
# with less, the runs stop at their time limits and their summaries say so.
#
# It installs nothing: capsnet runs from this checkout (PYTHONPATH=src) with $PYTHON (default
# python3), which needs torch with CUDA. Data: MNIST and Fashion-MNIST through capsnet's own
# verified sources (the cache, else a download), or --data-dir DIR holding mnist/ and
# fashion-mnist/. Each run is recorded in OUT/NAME/ as the GPU campaign records its runs
# (docs/GPU_CAMPAIGN.md); at the end the script prints how to turn them into the tables.
set -euo pipefail

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "reproduce_gpu.sh: $PYTHON cannot import torch; install torch (a CUDA build) or set PYTHON" >&2
    exit 2
fi
exec "$PYTHON" "$(dirname "$0")/reproduce_gpu.py" "$@"
