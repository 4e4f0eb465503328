#!/usr/bin/env bash
# The README's main job: set-up (.ci/setup: venv, package, Fashion-MNIST from Debian), then the offline demo. Extra arguments go to recipes/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/python recipes/demo.py "$@"
