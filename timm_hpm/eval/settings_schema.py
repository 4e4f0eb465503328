"""The schema version of a run's settings (the header of its store, :mod:`timm_hpm.eval.run_header`; the
``settings.json`` of earlier versions).

Runs record ``"schema_version": SCHEMA_VERSION`` with their settings, so a reader knows what they mean instead of
guessing it from which keys are there. Settings without it are version 1 (written before versions were recorded)
and are upgraded on reading by :func:`_upgrade_v1`, the one place that knows what those runs did; version 2 is the
same settings in a ``settings.json`` file; version 3 keeps them in the header line of the run's store; version 4
adds MSA's ``completion_rounds`` and version 5 its ``search_sweeps`` (:func:`_upgrade_v3`: earlier runs had no
completion stage and no local search). A newer
version than this code knows is refused. ``python -m timm_hpm.eval.migrate_runs`` writes the upgrade to disk, with
the keys it filled in (``filled_by_upgrade``) so the run's settings as it recorded them are still known
(:func:`as_recorded`: what eval.json embeds, identical before and after the upgrade).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

__all__ = ['SCHEMA_VERSION', 'ADDED_SINCE_V3', 'upgrade_settings', 'read_settings', 'comparable', 'as_recorded',
           'settings_as_run', 'msa_options_as_today']

#: 1: no version recorded (MSA v1 to v3 runs); 2: the version is recorded and every MSA option is explicit;
#: 3: the same settings in the header line of the run's store instead of settings.json (and fingerprint.json);
#: 4: MSA's completion_rounds (the completion stage) recorded; 5: MSA's search_sweeps (the local search) recorded.
SCHEMA_VERSION = 5
_META = ('schema_version', 'filled_by_upgrade')


def _upgrade_v1(settings: dict) -> Tuple[dict, List[str]]:
    """Version 1 -> 2: what a run of an earlier version actually did, filled in for the MSA options added since
    (before MSA v2: APGD-T through the target had the surrogates' target count, no transfer models, no combination
    round; before v3: no iterate was scored, the whole-batch APGD always ran), so such a run resumes or is extended
    with equivalent options. Returns the upgraded settings and the keys filled in (``msa.<option>``)."""
    msa = settings.get('msa')
    if not isinstance(msa, dict):
        return dict(settings), []  # a poisoning run's settings: nothing was added since
    upgraded = dict(msa)
    if 'target_n_target_classes' not in msa:
        upgraded.update(target_n_target_classes=msa.get('n_target_classes'), combine_rounds=0,
                        surrogate_models=msa.get('surrogate_models', []))
    upgraded.setdefault('score_iterates', False)
    upgraded.setdefault('surrogate_apgd', True)
    return dict(settings, msa=upgraded), [f'msa.{k}' for k in upgraded if k not in msa]


#: MSA options added since settings schema 3 -> the value that reproduces what an attack recorded before ran.
ADDED_SINCE_V3 = {'completion_rounds': 0, 'search_sweeps': 0}


def msa_options_as_today(msa: dict) -> Tuple[dict, List[str]]:
    """MSA options (``MSAConfig.to_dict()``) recorded before the options of :data:`ADDED_SINCE_V3` existed, with
    them filled in as what that attack ran (no completion stage, no local search); and the options filled. Also for
    records outside run folders that embed an attack (a study's score definitions)."""
    added = [k for k in ADDED_SINCE_V3 if k not in msa]
    return dict(msa, **{k: ADDED_SINCE_V3[k] for k in added}), added


def _upgrade_v3(settings: dict) -> Tuple[dict, List[str]]:
    """Version 3 or 4 (or an upgraded earlier one) -> 5: a run made before MSA had its completion stage or its
    local search ran neither (``completion_rounds`` 0, ``search_sweeps`` 0)."""
    msa = settings.get('msa')
    if not isinstance(msa, dict):
        return dict(settings), []
    msa, added = msa_options_as_today(msa)
    return dict(settings, msa=msa), [f'msa.{k}' for k in added]


def upgrade_settings(stored: dict) -> dict:
    """``stored`` (a settings file's content) in the current schema; a newer schema is a ValueError."""
    version = stored.get('schema_version', 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f'settings schema_version {version!r} is not a version (an integer >= 1)')
    if version > SCHEMA_VERSION:
        raise ValueError(f'these settings were written by a newer timm-hpm (settings schema_version {version}; this '
                         f'one reads up to {SCHEMA_VERSION}); upgrade timm-hpm to read this run folder.')
    settings, filled = _upgrade_v1(stored) if version == 1 else (dict(stored), [])  # 2 -> 3: where they are stored
    if version < 5:
        settings, added = _upgrade_v3(settings)
        filled = list(stored.get('filled_by_upgrade', [])) + filled + added  # a migrated run's earlier fillings kept
    return dict(settings, schema_version=SCHEMA_VERSION, **({'filled_by_upgrade': filled} if filled else {}))


def read_settings(path: Path) -> dict:
    """The settings file at ``path`` in the current schema (a newer one: a ValueError naming the file)."""
    try:
        return upgrade_settings(json.loads(Path(path).read_text()))
    except ValueError as error:
        raise ValueError(f'{path}: {error}') from None


def comparable(settings: dict) -> dict:
    """The evaluation's settings alone (not the file's schema bookkeeping): what two runs must share."""
    return {k: v for k, v in settings.items() if k not in _META}


def as_recorded(settings: dict) -> dict:
    """Current-schema ``settings`` as the run's own settings file recorded them (the upgrade's fillings removed):
    what eval.json embeds, so re-aggregating an upgraded run gives the same eval.json."""
    filled = settings.get('filled_by_upgrade', [])
    out = comparable(settings)
    for key in filled:
        section, name = key.split('.', 1)
        out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def settings_as_run(previous: dict) -> dict:
    """Stored settings (a settings file's or eval.json's) with what the run actually did filled in for the options
    added since it ran: the current schema's content, without its bookkeeping."""
    return comparable(upgrade_settings(previous))
