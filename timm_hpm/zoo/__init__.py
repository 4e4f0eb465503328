"""The model zoo manifest (``timm_hpm/zoo/zoo.yaml``, package data; ``recipes/zoo.yaml`` in a checkout links to it):
one entry per published HPM tag, checked field by field, and the build plan of an entry (what ``timm-hpm-zoo`` runs:
base checkpoint, fine-tuning, the base under AutoAttack, the HPM model under MSA, the Hub folder and card, the push),
each step's command and whether it is done, and the README's zoo table.

The RobustBench facts of a base (its architecture, tag, reported figures) come from timm_hpm/robustbench_table.py;
the manifest names the base only. Library code: timm_hpm.cli.build_zoo composes it, tests/test_zoo.py tests it.
"""
from .build import (BuildOptions, Step, build_command, build_record, check_build_record, entry_status, export_base,
                    format_command, plan_steps, zoo_table)
from .manifest import (DEFAULT_MANIFEST, EVAL_OPTIONS, CardFacts, EvalSettings, ZooEntry, ZooError, load_manifest,
                       override_eval, parse_entry)

__all__ = ['DEFAULT_MANIFEST', 'EVAL_OPTIONS', 'ZooError', 'EvalSettings', 'CardFacts', 'ZooEntry', 'parse_entry',
           'load_manifest', 'override_eval', 'BuildOptions', 'Step', 'plan_steps', 'build_record',
           'check_build_record', 'build_command', 'entry_status', 'zoo_table', 'export_base', 'format_command']
