"""The build of one zoo entry (what ``timm-hpm-zoo``, ``python -m timm_hpm.cli.build_zoo``, runs: base checkpoint,
fine-tuning, the base under AutoAttack, the HPM model under MSA, the Hub folder and card, the push), each step's
command and whether it is done, and the README's zoo table. The steps run the package's modules
(``python -m timm_hpm.cli.finetune``, ``...evaluate``, ``...push_to_hub``): a build needs no checkout."""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence


from .manifest import ZooEntry, ZooError, _DATA_NEEDS

__all__ = ['BuildOptions', 'Step', 'plan_steps', 'build_record', 'check_build_record', 'build_command',
           'entry_status', 'zoo_table', 'export_base', 'format_command']


@dataclass
class BuildOptions:
    """How one build runs: where, on what, and the budget overrides of a rehearsal."""
    out: Path
    data_dir: Optional[str] = None
    model_dir: str = './models'  # RobustBench's layout <model_dir>/<dataset>/<threat>/<Name>.pt
    device: Optional[str] = None  # 'cpu' forces the CPU
    launcher: str = 'python'  # 'python' or 'accelerate' (accelerate launch for fine-tuning and evaluation)
    launch_args: List[str] = field(default_factory=list)  # e.g. ['--multi_gpu', '--num_processes', '8']
    max_steps: Optional[int] = None  # fine-tuning budget override
    sets: List[str] = field(default_factory=list)  # fine-tuning --set KEY=VALUE overrides
    push: bool = False
    cards_dir: Optional[Path] = None  # default <out>/cards (hub_cards/ only when asked)
    overwrite_card: bool = False  # replace a different card in cards_dir (and, with push, the one on the Hub)
    python: str = sys.executable


@dataclass
class Step:
    name: str
    done: Path  # the file whose presence means the step is done
    command: Optional[List[str]]  # None: run in process (the base export)
    description: str

    @property
    def is_done(self) -> bool:
        return self.done.is_file()


def _base_ref(entry: ZooEntry, out: Path) -> str:
    """The base as evaluate.py loads it: the registered tag, or the exported RobustBench checkpoint."""
    return f'local-dir:{out / "base"}' if entry.is_robustbench else entry.base


def _launch(opts: BuildOptions, name: str) -> List[str]:
    """The command that starts the package's module ``timm_hpm.cli.<name>`` (under ``accelerate launch -m`` with
    the accelerate launcher)."""
    module = f'timm_hpm.cli.{name}'
    if opts.launcher == 'accelerate':
        return [opts.python, '-m', 'accelerate.commands.launch', *opts.launch_args, '-m', module]
    return [opts.python, '-m', module]


def plan_steps(entry: ZooEntry, opts: BuildOptions) -> List[Step]:
    """The build of ``entry`` into ``opts.out``, in order; a step whose ``done`` file exists is skipped, and each
    command resumes its own half-done run folder (finetune.py --resume, evaluate.py's batch files)."""
    out, ev = Path(opts.out), entry.eval
    device = ['--device', opts.device] if opts.device else []
    data = ['--data-dir', str(opts.data_dir)] if opts.data_dir else []
    steps = []
    if entry.is_robustbench:
        rb = entry.robustbench
        steps.append(Step('base', out / 'base' / 'model.safetensors', None,
                          f'{rb.name} ({rb.dataset}/{rb.threat_model}) from {opts.model_dir} (downloaded when '
                          f'missing) -> {out / "base"}'))

    run = out / 'finetune'
    if (run / 'config.yaml').is_file():  # a started run: continue it with its settings (the budget may change)
        finetune = [*_launch(opts, 'finetune'), '--resume', str(run)]
    else:
        sets = ([f'model.robustbench_dir={opts.model_dir}'] if entry.is_robustbench else []) + \
               ([f'data.data_dir={opts.data_dir}'] if opts.data_dir else []) + list(opts.sets)
        finetune = [*_launch(opts, 'finetune'), '--config', str(entry.config_path), '--output-dir', str(run)] + \
            (['--set', *sets] if sets else [])
    if opts.max_steps is not None:
        finetune += ['--max-steps', str(opts.max_steps)]
    steps.append(Step('finetune', run / 'final' / 'model.safetensors', finetune + device,
                      f'HPM fine-tuning ({entry.config}) -> {run}'))

    common = ['--dataset', ev.dataset, *data, '--eps', ev.eps, '--norm', ev.norm, '--n-examples',
              str(ev.n_examples), '--batch-size', str(ev.batch_size), *device]
    aa_options = [a for key in ('autoattack_iters', 'square_queries') if getattr(ev, key) is not None
                  for a in (f"--{key.replace('_', '-')}", str(getattr(ev, key)))]
    steps.append(Step('eval_base', out / 'eval_base' / 'eval.json',
                      [*_launch(opts, 'evaluate'), '--model', _base_ref(entry, out), '--protocol', 'autoattack',
                       *common, *aa_options, '--out', str(out / 'eval_base')],
                      f'the base under AutoAttack (standard), {ev.n_examples} images -> {out / "eval_base"}'))
    surrogates = ['--surrogate-model', _base_ref(entry, out)] if ev.base_surrogate else []
    steps.append(Step('eval_hpm', out / 'eval_hpm' / 'eval.json',
                      [*_launch(opts, 'evaluate'), '--model', f'local-dir:{run / "final"}', '--protocol', 'msa',
                       *common, '--batchings', *ev.batchings, '--surrogates', *ev.surrogates, *ev.options(),
                       *surrogates, '--out', str(out / 'eval_hpm')],
                      f'the HPM model under MSA ({", ".join(ev.batchings)}), {ev.n_examples} images -> '
                      f'{out / "eval_hpm"}'))

    card = entry.card
    push = [opts.python, '-m', 'timm_hpm.cli.push_to_hub', '--run', str(run / 'final'),
            '--results', str(out / 'eval_hpm' / 'eval.json'), '--base-results', str(out / 'eval_base' / 'eval.json'),
            '--training-config', str(run / 'config.yaml'), '--base-model', card.base_model, '--repo-id', card.repo_id,
            '--license', card.license, *(['--license-name', card.license_name] if card.license_name else []),
            '--out', str(out / 'hub'), '--cards-dir', str(opts.cards_dir or out / 'cards')] + \
        (['--overwrite-card'] if opts.overwrite_card else [])
    if opts.push:
        steps.append(Step('push', out / 'pushed.json', push, f'upload {out / "hub"} to {card.repo_id}'))
    else:
        steps.append(Step('hub_dry_run', out / 'hub' / 'README.md', push + ['--dry-run'],
                          f'Hub folder and card -> {out / "hub"} (dry run: nothing uploaded)'))
    return steps


#: BuildOptions fields that change what a build produces (a folder built with others is refused).
_RECORDED = ('data_dir', 'model_dir', 'max_steps', 'sets')


def build_record(entry: ZooEntry, opts: BuildOptions) -> dict:
    """What a build folder is the build of: the entry and the overrides (written to ``<out>/build.json``)."""
    return {'entry': json.loads(json.dumps(entry.to_dict())),
            **{k: (str(getattr(opts, k)) if k == 'data_dir' and opts.data_dir else getattr(opts, k))
               for k in _RECORDED}}


def check_build_record(path: Path, record: dict) -> None:
    """Refuse a build folder that holds another build (another entry, settings or budget): its finished steps would
    be skipped and published as this build's."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    config = old.get('entry', {}).get('config') if isinstance(old.get('entry'), dict) else None
    if isinstance(config, str) and config.startswith('recipes/configs/') and config.endswith('.yaml'):
        # recorded before the configs became package data: the checkout's path of the packaged config of that name
        old['entry']['config'] = config[len('recipes/configs/'):-len('.yaml')]
    if old != record:
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if 'entry' in diff:
            diff.remove('entry')
            diff += sorted(f'entry.{k}' for k in set(old['entry']) | set(record['entry'])
                           if old['entry'].get(k) != record['entry'].get(k))
        raise ZooError(f'{path.parent} holds a build with other settings ({", ".join(diff)}); its finished steps '
                       'would be taken for this build. Use another --out, or the same settings.')


def build_command(entry: ZooEntry) -> str:
    """The one command that builds and (dry-run) publishes the entry."""
    cmd = f'python recipes/build_zoo.py {entry.tag}'
    if entry.eval.dataset == 'imagenet':
        cmd += ' --data-dir <ImageNet root>'
    if entry.hardware == 'gpu':
        cmd += ' --launcher accelerate'
    return cmd


def entry_status(entry: ZooEntry, here: bool = False, model_dir: str = './models', data_dir: Optional[str] = None
                 ) -> str:
    """'shipped' (the weights are in the package), 'ready to build' or 'needs ...': what a build needs beyond the
    repository. ``here``: checked on this machine (data, checkpoint, GPU found or not); otherwise what any machine
    needs (the README)."""
    import timm
    if entry.tag in timm.list_models(pretrained=True):
        return 'shipped'
    needs = []
    if entry.hardware == 'gpu':
        import torch
        if not (here and torch.cuda.is_available()):
            needs.append('a GPU')
    if entry.eval.dataset in _DATA_NEEDS:
        if not here or not _data_present(entry.eval.dataset, data_dir):
            needs.append(_DATA_NEEDS[entry.eval.dataset])
    if entry.is_robustbench:
        from ..robustbench import checkpoint_path
        rb = entry.robustbench
        if not here or not checkpoint_path(rb, model_dir).is_file():
            needs.append('the RobustBench checkpoint (downloaded when online)')
    return 'needs ' + ', '.join(needs) if needs else 'ready to build'


def _data_present(dataset: str, data_dir: Optional[str]) -> bool:
    from ..data import CIFAR_BINARY
    root = Path(data_dir or Path.home() / '.cache' / 'timm_hpm')
    if dataset == 'imagenet':
        return (root / 'train').is_dir() and (root / 'val').is_dir()
    python = 'cifar-10-batches-py' if dataset == 'cifar10' else 'cifar-100-python'
    return (root / python).is_dir() or (root / CIFAR_BINARY[dataset][0]).is_dir()


def zoo_table(entries: Dict[str, ZooEntry], here: bool = False) -> str:
    """The README's zoo table: every entry, its base with RobustBench's reported figures, status, command."""
    from ..report import markdown_table
    rows = []
    for entry in entries.values():
        ev = entry.eval
        if entry.is_robustbench:
            rb = entry.robustbench
            base = f'RobustBench `{rb.name}` ({rb.dataset}, {rb.threat_model} {rb.eps})'
            clean, robust = (f'{v}%' if v else '-' for v in (rb.reported_clean, rb.reported_autoattack))
        else:
            base, clean, robust = f'`{entry.base}` (not on RobustBench)', '-', '-'
        rows.append([f'`{entry.tag}`', base, clean, robust,
                     f'{ev.dataset}, {ev.norm} eps {ev.eps}, {ev.n_examples} images', entry_status(entry, here),
                     f'`{build_command(entry)}`'])
    return markdown_table(['entry', 'base', 'base clean (RobustBench)', 'base AutoAttack (RobustBench)',
                           'evaluation', 'status', 'build (dry-run publish; add --push to upload)'], rows, 'llrrlll')


def export_base(entry: ZooEntry, model_dir: str, folder: Path) -> Path:
    """The RobustBench base checkpoint (RobustBench's layout under ``model_dir``; downloaded when missing and
    online) as a ``local-dir:`` folder, with its tag's preprocessing (where the plain architecture is timm's own, its
    default cfg would say another resize and crop)."""
    from timm.models import get_pretrained_cfg

    from ..hub import save_for_hub
    from ..models import hpm_variant
    from ..robustbench import load_robustbench_model
    rb = entry.robustbench
    model = load_robustbench_model(rb.name, rb.dataset, rb.threat_model, model_dir=model_dir).eval()
    tag_cfg = get_pretrained_cfg(f'{hpm_variant(rb.architecture)}.{rb.tag}').to_dict()
    if model.pretrained_cfg.get('tag') != rb.tag:
        cfg = dict(model.pretrained_cfg)
        for key in ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'license', 'origin_url',
                    'paper_name', 'paper_ids', 'notes', 'tag'):
            cfg.pop(key, None)
            if key in tag_cfg:
                cfg[key] = tag_cfg[key]
        for key in ('test_input_size', 'test_crop_pct', 'url', 'hf_hub_id', 'file'):
            cfg.pop(key, None)
        model.pretrained_cfg = cfg
    part = folder.with_name(folder.name + '.part')
    save_for_hub(model, part)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    part.rename(folder)
    return folder


def format_command(command: Sequence[str]) -> str:
    """The command line, shell-quoted: ``shlex.split`` gives ``command`` back."""
    return shlex.join(str(c) for c in command)
