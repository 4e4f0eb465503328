#!/usr/bin/env bash
# timm's own tests/test_models.py, run over every model timm-hpm registers (and nothing else), every pretrained tag
# of each included: each test runs once per registered model.tag (a tag sets the input size, pool size, number of
# classes and per-tag model arguments), not only on the default cfgs timm's own runs pick.
#
#   bash recipes/checks/timm_model_tests.sh /path/to/pytorch-image-models [pytest arguments]
#   TAGS=default bash recipes/checks/timm_model_tests.sh ...   # timm's own choice: tags in its cfg tests only
#
# One model.tag: add -k 'hpm_resnet50.rb_wong2020fast_imagenet' (the whole run builds every full-size model, WRN-106-16
# among them, and peaks near 17 GB of memory).
#
# Uses the installed timm (only the checkout's tests/ folder is copied, to a temporary folder) and this
# project's .venv (or $PYTHON). Deselected, because they are not about a registered model:
#   test_model_inference  downloads timm's own test_* weights from the Hub (needs the network);
#   naflex / gemma        tests of two timm models, with no model parameter;
#   regnetx               a TorchScript test hard-wired to timm's regnetx_002.
set -euo pipefail
timm_repo=$(cd "${1:?usage: $0 /path/to/pytorch-image-models [pytest args]}" && pwd)
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$timm_repo/tests" "$work/tests"
cat > "$work/tests/conftest.py" <<'PY'
import os

import timm
import timm_hpm

_list_models = timm.list_models
_ours = set(timm_hpm.list_models())
_every_tag = os.environ.get('TAGS', 'all') != 'default'


def list_models(*args, **kwargs):
    if _every_tag and kwargs.get('include_tags') is None:
        kwargs['include_tags'] = True  # every model.tag, not only the default cfg
    return [name for name in _list_models(*args, **kwargs) if name.split('.')[0] in _ours]


timm.list_models = list_models  # before test_models.py imports it
PY
cd "$work"
"$python" -m pytest -q -p no:cacheprovider tests/test_models.py -rfs \
    -k 'not test_model_inference and not naflex and not gemma and not regnetx' "$@"
