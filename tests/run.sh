#!/usr/bin/env bash
# The test command of the README: sets up .venv (first run: a few minutes) and runs pytest on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/python -m pytest -q tests "$@"
