#!/usr/bin/env bash
# The README's main job: set-up (.ci/setup: venv, package, Fashion-MNIST from Debian), then the offline pipeline
# (shipped base -> HPM fine-tune -> AutoAttack vs MSA on 500 test images -> sensitivity figure).
# Extra arguments go to recipes/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/python recipes/quickstart.py "$@"
