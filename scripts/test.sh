#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Playwright drives Debian's chromium in the browser tests: never download its own browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
# One worker per core (pytest-xdist), each taking whole files: a file's module fixtures (its
# tiny trainings) are made once, and the many short capsnet processes of the hostile-input
# tests overlap. The 25 slowest are listed at the end.
.venv/bin/python -m pytest -q -n auto --dist loadfile --durations=25 "$@"
