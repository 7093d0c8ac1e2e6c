#!/usr/bin/env bash
# Create .venv (if missing) and install capsnet into it with the CPU build of torch.
# Usage: scripts/setup.sh [EXTRAS]   e.g. "test" adds the test tools and Debian's chromium
# for the browser tests (installing chromium needs root when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip torch==2.13.0  # before capsnet: a bare torch requirement would pull the CUDA build
if [ -n "$extras" ]; then
    pip -e ".[$extras]"
else
    pip -e .
fi
if [[ ",$extras," == *",test,"* ]] && [ ! -x /usr/bin/chromium ]; then
    apt-get update -q
    apt-get install -y -q chromium
fi
