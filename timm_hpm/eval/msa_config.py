"""MSA's options (:class:`MSAConfig`): the one place that says what each option is, its range and its command-line
flag. Each field's ``metadata`` carries its ``recipes/evaluate.py`` flag and help text, so that the command line is
generated from the fields (:func:`timm_hpm.cli.config_args.add_config_arguments`) and an option's error names
its flag (:data:`CLI_FLAGS`); a field without a ``flag`` has no command-line option (set it in Python)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Sequence

from ..attacks import check_count, check_eps, check_flag, option_label
from ..attacks._ball import NORMS
from ..layers.hpm_head import HPM_MODES
from .autoattack import AUTOATTACK_VERSIONS

__all__ = ['MSAConfig', 'CLI_FLAGS']


def _names(value, name: str, optional: bool = False, choices: Optional[Sequence[str]] = None) -> Optional[List[str]]:
    """A list of names (a sequence of distinct strings, from ``choices`` when given; not one string, whose letters
    would be taken for names), or a ValueError naming the option."""
    if value is None and optional:
        return None
    label = option_label(name, value, CLI_FLAGS.get(name))
    if isinstance(value, str):
        raise ValueError(f'{label}: must be a list of names, not one string (e.g. [{value!r}])')
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f'{label}: must be a list of names (non-empty strings)')
    unknown = [v for v in value if choices is not None and v not in choices]
    if unknown:
        raise ValueError(f'{label}: unknown {unknown}; choose from {list(choices)}')
    if len(set(value)) != len(value):
        raise ValueError(f'{label}: names one twice')
    return list(value)


def _opt(flag: str, help: str, **argparse_options) -> dict:
    """A field's command-line option: its flag, help text and any further ``add_argument`` keyword (``negated``: a
    ``--no-...`` flag that turns a default-True field off)."""
    return {'flag': flag, 'help': help, **argparse_options}


@dataclass
class MSAConfig:
    """Options of the protocol (all reported in the results). Checked when made (and by :meth:`validate`, which
    :func:`msa`, :func:`attack_batch` and the runner call again): an option out of its range is a ValueError naming
    it, its value, its ``recipes/evaluate.py`` flag and the valid range, before any work."""
    # on the command line a string ('8/255', type None: as given), parsed by the command (parse_eps)
    eps: float = field(metadata=_opt('--eps', "'8/255', 0.031, ...", required=True, type=None))
    norm: str = field(default='Linf', metadata=_opt('--norm', 'threat model', choices=list(NORMS)))
    surrogates: Sequence[str] = field(default=('fc', 'static', 'soft', 'dynamic'), metadata=_opt(
        '--surrogates', "MSA's surrogate views of the HPM head, attacked with whole-batch APGD-CE/APGD-T"))
    # names of other models attacked after the head's modes (e.g. the base); the command line takes the models
    surrogate_models: Sequence[str] = field(default=(), metadata=_opt(
        '--surrogate-model', "another model MSA attacks through, after the head's modes: a timm name, 'local-dir:' "
        "or 'hf-hub:' (repeatable)", action='append', default=None, metavar='NAME'))
    apgd_iters: int = field(default=100, metadata=_opt('--apgd-iters', "iterations of MSA's whole-batch APGD"))
    # APGD-T targets per surrogate (cost: see the MSA benchmark)
    n_target_classes: int = field(default=3, metadata=_opt('--n-target-classes', 'APGD-T targets per surrogate'))
    target_n_target_classes: int = field(default=9, metadata=_opt(
        '--target-n-target-classes', "APGD-T targets through the target itself (its 'dynamic' view): AutoAttack's 9"))
    combine_rounds: int = field(default=3, metadata=_opt(
        '--combine-rounds', "whole-batch combinations of every stage's breaks after the last stage (0: none)"))
    # 0 in MSA v4 (the default); a second try at the gap between the realised batch and the union (issue #30)
    search_sweeps: int = field(default=0, metadata=_opt(
        '--search-sweeps', "sweeps of a local search after the combinations: each image that broke a sample the "
        "realised batch still classifies correctly put in alone, kept when the batch's accuracy drops (forward "
        "passes only; 0: none)"))
    # 0 in MSA v4 (the default); the stage that aims at the gap between the realised batch and the union (issue #30)
    completion_rounds: int = field(default=0, metadata=_opt(
        '--completion-rounds', "rounds of whole-batch APGD through the target on the realised batch after the last "
        "surrogate: its misclassified samples frozen, a sample an earlier candidate broke started from that image "
        "(0: none)"))
    score_iterates: bool = field(default=True, metadata=_opt(
        '--no-score-iterates', "do not score every whole batch a batch-dependent surrogate's APGD evaluates on the "
        "target (MSA v2; only the per-sample best images of each run are scored)", negated=True))
    surrogate_apgd: bool = field(default=True, metadata=_opt(
        '--no-surrogate-apgd', "skip MSA's whole-batch APGD through the surrogates; with --surrogate-autoattack "
        "--no-cascade --combine-rounds 0 --no-score-iterates: the paper's protocol (AutoAttack on each surrogate, "
        "transferred, per-sample worst case), for comparison only", negated=True))
    autoattack: bool = True  # the standard AutoAttack cascade on the target, re-scored on fixed batches
    autoattack_version: str = 'standard'
    autoattack_attacks: Optional[Sequence[str]] = None  # with autoattack_version='custom'
    autoattack_iters: Optional[int] = field(default=None, metadata=_opt(
        '--autoattack-iters', "default: AutoAttack's own (100)"))
    square_queries: Optional[int] = field(default=None, metadata=_opt(
        '--square-queries', "default: AutoAttack's own (5000)"))
    surrogate_autoattack: bool = field(default=False, metadata=_opt(
        '--surrogate-autoattack', "also each surrogate's AutoAttack cascade"))  # APGD-CE, APGD-T, FAB-T
    cascade: bool = field(default=True, metadata=_opt(
        '--no-cascade', 'attack every clean-correct sample at every stage', negated=True))
    seed: int = field(default=0, metadata=_opt('--seed', 'attack seeds (each batch derives its own)'))

    def __post_init__(self):
        self.validate()

    def validate(self) -> 'MSAConfig':
        """Every option's type and range (budgets of at least one iteration, query and target class; eps finite,
        > 0 and, for Linf, at most 1), or a ValueError naming the option; returns the config."""
        flag = CLI_FLAGS.get
        if self.norm not in NORMS:
            raise ValueError(f"{option_label('norm', self.norm, flag('norm'))}: must be one of {list(NORMS)}")
        check_eps(self.eps, self.norm, 'eps', flag('eps'))
        _names(self.surrogates, 'surrogates', choices=HPM_MODES)
        _names(self.surrogate_models, 'surrogate_models')
        for name, least, what in _COUNTS:
            check_count(getattr(self, name), name, least, flag(name), what=what,
                        optional=name in ('autoattack_iters', 'square_queries'))
        for name in ('score_iterates', 'surrogate_apgd', 'autoattack', 'surrogate_autoattack', 'cascade'):
            check_flag(getattr(self, name), name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{option_label('seed', self.seed, flag('seed'))}: must be an integer")
        self._check_autoattack()
        return self

    def _check_autoattack(self) -> None:
        """AutoAttack's version and attacks, and that some attack is on."""
        if self.autoattack_version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"{option_label('autoattack_version', self.autoattack_version)}: must be one of "
                             f'{list(AUTOATTACK_VERSIONS)}')
        attacks = _names(self.autoattack_attacks, 'autoattack_attacks', optional=True)
        if self.autoattack_version == 'custom' and self.autoattack and not attacks:
            raise ValueError("autoattack_version='custom' needs autoattack_attacks, e.g. ['apgd-ce', 'apgd-t']")
        if self.autoattack_version != 'custom' and attacks:
            raise ValueError(f"autoattack_attacks={attacks} needs autoattack_version='custom'")
        if not (self.autoattack or self.surrogate_apgd or self.surrogate_autoattack):
            raise ValueError('no attack is on (autoattack, surrogate_apgd and surrogate_autoattack are all False): '
                             'the robust accuracy would be the clean accuracy; turn one on')

    def to_dict(self) -> dict:
        d = asdict(self)
        d['surrogates'] = list(self.surrogates)
        d['surrogate_models'] = list(self.surrogate_models)
        d['autoattack_attacks'] = list(self.autoattack_attacks) if self.autoattack_attacks else None
        return d


#: The budgets checked as counts: (field, least value, what it counts), in the order they are checked.
_COUNTS = (('apgd_iters', 1, "iterations of MSA's whole-batch APGD"),
           ('n_target_classes', 1, 'APGD-T target classes per surrogate'),
           ('target_n_target_classes', 1, 'APGD-T target classes through the target'),
           ('combine_rounds', 0, 'whole-batch combination rounds; 0: none'),
           ('search_sweeps', 0, 'sweeps of the local search over every stage\'s breaks; 0: none'),
           ('completion_rounds', 0, 'rounds of the completion through the target; 0: none'),
           ('autoattack_iters', 1, "AutoAttack's iterations; None: its own"),
           ('square_queries', 1, "Square's queries; None: AutoAttack's own"))

#: The ``recipes/evaluate.py`` flag of each option that has one (from the fields' metadata; the switches turned off
#: by a ``--no-...`` flag are named by their field alone): an option's error names both.
CLI_FLAGS = {**{f.name: f.metadata['flag'] for f in fields(MSAConfig)
                if 'flag' in f.metadata and not f.metadata.get('negated')},
             'batch_size': '--batch-size'}
