"""The model zoo manifest (``timm_hpm/zoo/zoo.yaml``, package data; ``recipes/zoo.yaml`` in a checkout links to it):
one entry per published HPM tag, checked field by field.

The RobustBench facts of a base (its architecture, tag, reported figures) come from timm_hpm/robustbench_table.py;
the manifest names the base only. An entry's fine-tuning ``config`` is the name of a config shipped with the package
(``timm_hpm/configs/<name>.yaml``) or a YAML file, relative to the manifest's folder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = ['DEFAULT_MANIFEST', 'EVAL_OPTIONS', 'ZooError', 'EvalSettings', 'CardFacts', 'ZooEntry', 'parse_entry',
           'load_manifest', 'override_eval']


#: The manifest shipped with the package.
DEFAULT_MANIFEST = Path(__file__).resolve().parent / 'zoo.yaml'

#: recipes/evaluate.py's MSA/AutoAttack options a manifest entry may set (``None``: evaluate.py's default).
EVAL_OPTIONS = {'apgd_iters': int, 'n_target_classes': int, 'target_n_target_classes': int, 'combine_rounds': int,
                'autoattack_iters': int, 'square_queries': int}
_BATCHINGS = ('default', 'single', 'shuffled', 'class_sorted')  # timm_hpm.eval.BATCHINGS (checked by a test)
_SURROGATES = ('fc', 'static', 'soft', 'dynamic')
_DATA_NEEDS = {'cifar10': 'CIFAR-10 (downloaded when online)', 'cifar100': 'CIFAR-100 (downloaded when online)',
               'imagenet': 'ImageNet (an ImageFolder root)'}


class ZooError(ValueError):
    """A manifest entry that cannot be built, or a build folder that holds another build; the message names the
    entry and the field."""


@dataclass(frozen=True)
class EvalSettings:
    dataset: str
    eps: str
    n_examples: int
    batch_size: int
    norm: str = 'Linf'
    batchings: Tuple[str, ...] = ('default',)
    surrogates: Tuple[str, ...] = _SURROGATES
    base_surrogate: bool = False  # evaluate.py's --base-surrogate (off there too: see its help)
    apgd_iters: Optional[int] = None
    n_target_classes: Optional[int] = None
    target_n_target_classes: Optional[int] = None
    combine_rounds: Optional[int] = None
    autoattack_iters: Optional[int] = None
    square_queries: Optional[int] = None

    def options(self) -> List[str]:
        """evaluate.py's attack-strength options set here (shared by both evaluations where they apply)."""
        args = []
        for key in EVAL_OPTIONS:
            value = getattr(self, key)
            if value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        return args


@dataclass(frozen=True)
class CardFacts:
    repo_id: str
    license: str
    base_model: str
    license_name: Optional[str] = None


@dataclass(frozen=True)
class ZooEntry:
    tag: str  # the HPM model.tag published
    base: str  # a registered model.tag with weights, or rb:<RobustBench name>
    config: str  # fine-tuning config: a packaged config's name, or a YAML file relative to the manifest's folder
    hardware: str  # 'cpu' or 'gpu'
    eval: EvalSettings
    card: CardFacts
    #: the manifest's folder, which a config given as a file is relative to (not part of the entry: not recorded)
    root: Path = dataclasses.field(default=Path(__file__).resolve().parent, repr=False, compare=False)

    @property
    def is_robustbench(self) -> bool:
        return self.base.startswith('rb:')

    @property
    def robustbench(self):
        """The base's row of timm_hpm.robustbench's table (its dataset and threat model are the evaluation's)."""
        from ..robustbench import get_entry
        return get_entry(self.base[3:], self.eval.dataset, self.eval.norm)

    @property
    def config_path(self) -> Path:
        """The fine-tuning config's file: the packaged config of that name, or the file relative to the manifest's
        folder."""
        return config_file(self.config, self.root)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out['root']
        return out


def _fail(where: str, message: str):
    raise ZooError(f'{where}: {message}')


def _check_keys(where: str, given: dict, cls, required: Sequence[str]) -> None:
    if not isinstance(given, dict):
        _fail(where, f'expected a mapping, got {type(given).__name__}')
    known = {f.name for f in dataclasses.fields(cls)} - {'root'}  # ZooEntry.root is the manifest's folder
    unknown = sorted(set(given) - known)
    if unknown:
        _fail(where, f'unknown keys {unknown}; valid: {sorted(known)}')
    missing = [k for k in required if k not in given]
    if missing:
        _fail(where, f'missing keys {missing}')


def _parse_eval(where: str, raw: dict) -> EvalSettings:
    from ..attacks import parse_eps
    from ..data import DATASETS
    _check_keys(where, raw, EvalSettings, ('dataset', 'eps', 'n_examples', 'batch_size'))
    raw = dict(raw)
    if raw['dataset'] not in DATASETS:
        _fail(f'{where}.dataset', f'unknown dataset {raw["dataset"]!r}; choose from {DATASETS}')
    raw['norm'] = raw.get('norm', 'Linf')
    if raw['norm'] not in ('Linf', 'L2'):
        _fail(f'{where}.norm', f"must be 'Linf' or 'L2', got {raw['norm']!r}")
    raw['eps'] = str(raw['eps'])
    try:
        parse_eps(raw['eps'], raw['norm'])
    except ValueError as error:
        _fail(f'{where}.eps', str(error))
    for key in ('n_examples', 'batch_size', *EVAL_OPTIONS):
        value = raw.get(key)
        if value is None and key not in ('n_examples', 'batch_size'):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == 'combine_rounds' else 1):
            _fail(f'{where}.{key}', f'must be a positive integer, got {value!r}')
    for key, allowed in (('batchings', _BATCHINGS), ('surrogates', _SURROGATES)):
        if key in raw:
            values = raw[key]
            if isinstance(values, str) or not values or set(values) - set(allowed):
                _fail(f'{where}.{key}', f'a non-empty list of {allowed}, got {values!r}')
            raw[key] = tuple(values)
    if not isinstance(raw.get('base_surrogate', False), bool):
        _fail(f'{where}.base_surrogate', 'true or false')
    return EvalSettings(**raw)


def _parse_card(where: str, raw: dict) -> CardFacts:
    _check_keys(where, raw, CardFacts, ('repo_id', 'license', 'base_model'))
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(raw['repo_id'])
    except HFValidationError as error:
        _fail(f'{where}.repo_id', str(error))
    if '/' not in raw['repo_id']:
        _fail(f'{where}.repo_id', "give it as '<user or organisation>/<name>'")
    for key in ('license', 'base_model'):
        if not isinstance(raw[key], str) or not raw[key]:
            _fail(f'{where}.{key}', 'a non-empty string')
    if raw['license'] == 'other' and not raw.get('license_name'):
        _fail(f'{where}.license_name', "license 'other' needs a license_name")
    return CardFacts(**raw)


def config_file(config: str, root: Path) -> Path:
    """The file of an entry's ``config``: a packaged config's name (``timm_hpm/configs/<name>.yaml``), else a YAML
    file relative to ``root`` (the manifest's folder)."""
    from ..cli import CONFIG_DIR
    if '/' not in config and '\\' not in config and not config.endswith(('.yaml', '.yml')):
        return CONFIG_DIR / f'{config}.yaml'
    return Path(root) / config


def parse_entry(raw: dict, index: int = 0, root: Optional[Path] = None) -> ZooEntry:
    """One manifest entry, every field checked against the registry, RobustBench's table and its fine-tuning
    config; a ``ZooError`` names the entry and the field. ``root``: the folder a config given as a file is relative
    to (the manifest's; default the packaged manifest's)."""
    import timm

    import timm_hpm
    from timm.models import get_pretrained_cfg

    from ..attacks import parse_eps
    from ..models import hpm_variant
    where = f"entry {raw.get('tag', f'#{index}') if isinstance(raw, dict) else f'#{index}'}"
    _check_keys(where, raw, ZooEntry, ('tag', 'base', 'config', 'hardware', 'eval', 'card'))
    tag = raw['tag']
    arch = tag.split('.')[0]
    if '.' not in tag or tag not in timm.list_models(arch, include_tags=True):
        _fail(f'{where}.tag', f'{tag!r} is not a registered model.tag')
    if not timm_hpm.is_hpm_variant(arch):
        _fail(f'{where}.tag', f'{tag!r} is not an HPM model (an hpm_ variant)')
    if raw['hardware'] not in ('cpu', 'gpu'):
        _fail(f'{where}.hardware', f"'cpu' or 'gpu', got {raw['hardware']!r}")
    ev = _parse_eval(f'{where}.eval', raw['eval'])
    card = _parse_card(f'{where}.card', raw['card'])
    if not isinstance(raw['config'], str) or not raw['config']:
        _fail(f'{where}.config', f"a packaged config's name or a YAML file, got {raw['config']!r}")
    entry = ZooEntry(tag=tag, base=raw['base'], config=raw['config'], hardware=raw['hardware'], eval=ev, card=card,
                     **({'root': Path(root)} if root is not None else {}))

    base = entry.base
    if entry.is_robustbench:
        try:
            rb = entry.robustbench
        except KeyError as error:
            _fail(f'{where}.base', error.args[0])
        if hpm_variant(rb.architecture) != arch or rb.tag != tag.split('.', 1)[1]:
            _fail(f'{where}.base', f'{base} ({rb.dataset}/{rb.threat_model}) is {hpm_variant(rb.architecture)}.'
                                   f'{rb.tag} in timm_hpm/robustbench_table.py, not {tag}')
        if parse_eps(rb.eps, rb.threat_model) != parse_eps(ev.eps, ev.norm):
            _fail(f'{where}.eval.eps', f"{ev.eps} is not RobustBench's {rb.eps} for {base}")
    elif base not in timm.list_models(pretrained=True):
        _fail(f'{where}.base', f"{base!r} is neither rb:<RobustBench name> nor a registered model.tag whose weights "
                               'are available (timm.list_models(pretrained=True))')
    elif hpm_variant(base.split('.')[0]) != arch:
        _fail(f'{where}.base', f'{base} is not the plain architecture of {tag}')

    from ..train import ConfigError, load_config
    path = entry.config_path
    if not path.is_file():
        _fail(f'{where}.config', f'no such file: {path}')
    try:
        cfg = load_config(path)
    except (ConfigError, ValueError) as error:
        _fail(f'{where}.config', f'{path}: {error}')
    if cfg.model.name.split('.')[0] != arch:
        _fail(f'{where}.config', f'{entry.config} fine-tunes {cfg.model.name}, not the architecture of {tag}')
    if entry.is_robustbench and cfg.model.base != base:
        _fail(f'{where}.config', f'{entry.config} starts from model.base {cfg.model.base!r}, not {base}')
    if (cfg.data.dataset, cfg.attack.norm) != (ev.dataset, ev.norm) or cfg.eps != parse_eps(ev.eps, ev.norm):
        _fail(f'{where}.config', f'{entry.config} trains on {cfg.data.dataset} {cfg.attack.norm} eps '
                                 f'{cfg.attack.eps}; the evaluation is {ev.dataset} {ev.norm} eps {ev.eps}')
    tag_license = get_pretrained_cfg(tag).license
    expected = tag_license if tag_license and tag_license != 'unknown' else 'other'
    if card.license != expected:
        _fail(f'{where}.card.license', f"{card.license!r}, but {tag}'s pretrained cfg says {tag_license!r} "
                                       f'(expected {expected!r})')
    return entry


def load_manifest(path: Path = DEFAULT_MANIFEST, root: Optional[Path] = None) -> Dict[str, ZooEntry]:
    """The manifest's entries by tag, each checked (``ZooError`` on the first problem, naming it). ``root``: the
    folder its configs given as files are relative to (default: the manifest's folder)."""
    path = Path(path)
    root = path.resolve().parent if root is None else root
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ZooError(f'{path}: {error}') from None
    if not isinstance(raw, dict) or set(raw) != {'entries'} or not isinstance(raw['entries'], list):
        raise ZooError(f"{path}: expected one key, 'entries', a list of entries")
    entries: Dict[str, ZooEntry] = {}
    for i, item in enumerate(raw['entries']):
        try:
            entry = parse_entry(item, i, root)
        except ZooError as error:
            raise ZooError(f'{path}: {error}') from None
        if entry.tag in entries:
            raise ZooError(f'{path}: entry {entry.tag}: listed twice')
        entries[entry.tag] = entry
    return entries


def override_eval(entry: ZooEntry, changes: Dict[str, Any]) -> ZooEntry:
    """The entry with evaluation settings changed (rehearsals: fewer images, weaker attacks), checked as in the
    manifest."""
    if not changes:
        return entry
    raw = {k: v for k, v in dataclasses.asdict(entry.eval).items() if v is not None}
    raw.update(changes)
    for key in ('batchings', 'surrogates'):
        if isinstance(raw.get(key), str):
            raw[key] = raw[key].split(',')
    return dataclasses.replace(entry, eval=_parse_eval(f'entry {entry.tag}.eval (override)', raw))
