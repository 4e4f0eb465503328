"""Model cards generated from evaluation JSON (recipes/evaluate.py), never typed by hand."""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ['render_card', 'card_metadata', 'paired_comparison', 'TEMPLATE', 'HUB_DATASETS', 'CARD_TAGS']

#: The card template ships inside the package (package data), so cards render from a regular install too.
TEMPLATE = files('timm_hpm') / 'templates' / 'model_card.md.j2'
HUB_DATASETS = {
    'fashion_mnist': ('zalando-datasets/fashion_mnist', 'Fashion-MNIST'),
    'cifar10': ('uoft-cs/cifar10', 'CIFAR-10'),
    'cifar100': ('uoft-cs/cifar100', 'CIFAR-100'),
    'imagenet': ('ILSVRC/imagenet-1k', 'ImageNet-1k'),
    'synthetic': ('synthetic', 'synthetic data'),
}


def _pct(value: Optional[float]) -> str:
    return 'unknown' if value is None else f'{100 * value:.2f}%'


def _eps_text(eps: float, norm: str) -> str:
    if norm == 'Linf' and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f'{round(eps * 255)}/255'
    return f'{eps:g}'


#: The card's tags (with ``library_name: timm``, the Hub lists the model among timm's).
CARD_TAGS = ('image-classification', 'timm', 'timm-hpm', 'adversarial-robustness', 'hybrid-prototype-mixing')


def card_metadata(name: str, metrics, dataset_id: str, dataset_name: str, license: str = 'other',
                  license_name: str = 'unknown', base_model: Optional[str] = None) -> str:
    """The card's YAML metadata, by huggingface_hub's ``ModelCardData``: library, license, tags, dataset, base model,
    and the model-index of ``metrics`` (``name``/``value`` dicts: accuracies in %, on the dataset's test split)."""
    from huggingface_hub import EvalResult, ModelCardData
    results = [EvalResult(task_type='image-classification', task_name='Image Classification', dataset_type=dataset_id,
                          dataset_name=dataset_name, dataset_split='test', metric_type='accuracy',
                          metric_name=m['name'], metric_value=m['value'], verified=False) for m in metrics]
    return ModelCardData(
        library_name='timm', license=license, license_name=license_name if license == 'other' else None,
        pipeline_tag='image-classification', tags=list(CARD_TAGS), datasets=[dataset_id], base_model=base_model,
        model_name=name, eval_results=results).to_yaml()


def _check_results(result: Dict[str, Any], *others: Optional[Dict[str, Any]]) -> None:
    if result.get('protocol') != 'msa' or result.get('msa_acc') is None:
        raise ValueError('the card needs the HPM model\'s MSA result (recipes/evaluate.py --protocol msa).')
    for other in others:
        if other is not None and (other.get('eps') != result.get('eps')
                                  or other.get('threat_model') != result.get('threat_model')):
            raise ValueError(f"the HPM result and {other.get('name')}'s were measured under different threat models.")


def paired_comparison(model_flags: Dict[int, bool], other_flags: Dict[int, bool], other: str,
                      role: Optional[str] = None) -> Dict[str, Any]:
    """The HPM model against ``other`` on the same images, from each run's per-image robustness
    (:func:`timm_hpm.eval.robust_flags`): the images only one of them keeps, the difference in points with its paired
    95% interval and the exact sign-test p (the card's comparison lines). ``role`` (``'base'``, ``'control'``) tells
    the card's verdict which comparison this is."""
    from .report import paired, paired_difference
    counts = paired(other_flags, model_flags)  # refuses runs over different images
    order = sorted(other_flags)
    d = paired_difference([other_flags[i] for i in order], [model_flags[i] for i in order])
    return dict(other=other, role=role, n=counts['n'], only_other=counts['only_a'], only_model=counts['only_b'],
                difference=f"{100 * counts['difference']:+.1f}", ci_low=f"{100 * d['ci95'][0]:+.1f}",
                ci_high=f"{100 * d['ci95'][1]:+.1f}", p=f"{counts['p']:.2g}",
                lower=d['ci95'][1] < 0, higher=d['ci95'][0] > 0)


def _verdict(result: Dict[str, Any], base_result: Optional[Dict[str, Any]],
             control_result: Optional[Dict[str, Any]], comparisons: List[Dict[str, Any]]) -> Optional[str]:
    """The card's first lines in plain words: is this model more or less robust than its base and its budget-matched
    control, by the paired comparison on the same images (its 95% interval decides; without one, the figures alone
    are given and said to be unpaired)."""
    parts = []
    for role, other, what in (('base', base_result, 'its base'), ('control', control_result,
                                                                  'its budget-matched control')):
        if other is None or other.get('autoattack_acc') is None:
            continue
        c = next((c for c in comparisons if c.get('role') == role), None)
        figures = f"{_pct(result['msa_acc'])} vs {_pct(other['autoattack_acc'])}"
        if c is None:
            parts.append((None, f'{what} ({figures}; not compared image by image)'))
        else:
            word = 'less robust than' if c['lower'] else 'more robust than' if c['higher'] else \
                'not distinguishable in robustness from'
            parts.append((word, f"{what} ({figures}: {c['difference']} points, 95% CI {c['ci_low']} to "
                                f"{c['ci_high']}, p = {c['p']})"))
    if not parts:
        return None
    words = {w for w, _ in parts}
    if len(words) == 1 and None not in words:
        return f"**This model is {parts[0][0]} {' and '.join(t for _, t in parts)}.**"
    return '**Compared with ' + '; with '.join(f"{t}: {w or 'see the table'}" for w, t in parts) + '.**'


def _metrics(result: Dict[str, Any], eps_text: str) -> List[Dict[str, Any]]:
    """The model-index metrics (accuracies in %): this model's own results only, clean and the worst case measured
    (MSA's realised figure, the one the card says to use). The base's and the control's figures stay in the card's
    text: the Hub shows every model-index entry as a result of this model."""
    threat = f"({result['threat_model']}, eps={eps_text})"
    return [dict(name='Clean accuracy', value=round(100 * result['clean_acc'], 2)),
            dict(name=f'Robust accuracy, MSA worst case {threat}', value=round(100 * result['msa_acc'], 2))]


def _input_size(model_config: Dict[str, Any]) -> str:
    """``(B, C, H, W)`` of the exported model (its config's ``in_chans`` overrides the cfg's channels)."""
    input_size = tuple(model_config.get('pretrained_cfg', {}).get('input_size', ()))
    in_chans = model_config.get('model_args', {}).get('in_chans')
    if in_chans is not None and input_size:
        input_size = (in_chans, *input_size[1:])
    return f"(B, {', '.join(map(str, input_size))})"


def _training_text(hpm_cfg: Dict[str, Any], base_model: Optional[str], training_config: Optional[str]) -> str:
    if not training_config:
        return 'Training configuration: unknown.'
    options = ', '.join(f'{k}={v}' for k, v in hpm_cfg.items()) or 'defaults'
    return (f"Fine-tuned from {base_model or 'its base model'} with `recipes/finetune.py` (HPM options: {options}); "
            'the resolved config follows.')


def _poisoning(result: Optional[Dict[str, Any]], norm: str) -> Optional[Dict[str, Any]]:
    if result is None:
        return None
    rows = [dict(k=r['k'], batch_size=r['batch_size'],
                 flipped=f"{_pct(r['flipped_fraction'])} ({r['flipped']} of {r['victims']})",
                 eps=f"{norm} eps {_eps_text(r['eps'], norm)}" if r['bounded'] else 'unbounded (anywhere in [0, 1])',
                 bound=f"{r['feature_bound']} of {r['victims']}" if r.get('feature_bound') is not None else None)
            for r in result['poisoning']]
    # attack v2 (several runs, the best realised batch) records a feature-space bound per row; v1 (one PGD run) none
    return dict(rows=rows, n_examples=result['n_examples'], batch_size=result['batch_size'],
                steps=result['settings']['steps'], command=result.get('command', 'unknown'),
                bound=any(r['bound'] is not None for r in rows))


def render_card(result: Dict[str, Any], repo_id: str, model_config: Dict[str, Any],
                base_result: Optional[Dict[str, Any]] = None, training_config: Optional[str] = None,
                base_model: Optional[str] = None, license: str = 'other', license_name: str = 'unknown',
                template: Optional[Path] = None, unverified_results: Optional[str] = None,
                batch_order: Optional[Dict[str, Any]] = None, natural_result: Optional[Dict[str, Any]] = None,
                poisoning_result: Optional[Dict[str, Any]] = None, control_result: Optional[Dict[str, Any]] = None,
                comparisons: Optional[List[Dict[str, Any]]] = None) -> str:
    """The README.md of a Hub repo: YAML metadata (library_name, license, tags, datasets, base_model, model-index
    with this model's clean and MSA worst-case accuracies only) and the human-readable card, whose first lines say
    whether the model is more or less robust than its base and its budget-matched control.

    ``unverified_results``: why ``result`` may not have been measured on these weights; the card then says so
    above its figures. ``batch_order``: this model's row of ``recipes/batch_order_table.py``'s table.json (its
    ``accuracy`` by order and batch size, plus the table's ``n_test``, ``batch_sizes`` and ``command``);
    ``natural_result``: the eval.json of MSA on the worst natural batching (``--batchings class_sorted``);
    ``poisoning_result``: the eval.json of ``recipes/evaluate.py --protocol poison``; ``control_result``: the
    eval.json of the budget-matched control (the base fine-tuned with plain PGD-AT under this model's budget) under
    AutoAttack; ``comparisons``: :func:`paired_comparison` of this model against the base and the control."""
    import jinja2
    _check_results(result, base_result, control_result)
    dataset = result.get('dataset') or 'unknown'
    hub_id, dataset_name = HUB_DATASETS.get(dataset, (dataset, dataset))
    eps_text = _eps_text(result['eps'], result['threat_model'])
    name = repo_id.split('/')[-1]
    # one robust column: each model's valid figure (AutoAttack for the batch-independent base and control, MSA's
    # worst case for this batch-dependent model; AutoAttack alone on it is one MSA stage, shown nowhere as a figure)
    table = []
    if base_result is not None:
        table.append(dict(model=f"base ({base_result.get('name')})", clean=_pct(base_result['clean_acc']),
                          robust=_pct(base_result.get('autoattack_acc')), attack='AutoAttack (standard)'))
    if control_result is not None:
        table.append(dict(model=f"budget-matched control ({control_result.get('name')})",
                          clean=_pct(control_result['clean_acc']),
                          robust=_pct(control_result.get('autoattack_acc')), attack='AutoAttack (standard)'))
    table.append(dict(model=f'**this model** ({name})', clean=_pct(result['clean_acc']),
                      robust=f"**{_pct(result['msa_acc'])}**", attack='MSA, worst case over batchings (realised)'))
    per_batching = [dict(name=k, clean=_pct(v['clean_acc']), realised=_pct(v['realised_acc']),
                         union=_pct(v['union_acc']))
                    for k, v in result.get('batchings', {}).items()]
    args = model_config.get('model_args', {})
    order = None
    if batch_order is not None:
        order = dict(n_test=batch_order['n_test'], command=batch_order['command'],
                     batch_sizes=[str(b) for b in batch_order['batch_sizes']],
                     rows={name: {str(b): _pct(acc) for b, acc in row.items()}
                           for name, row in batch_order['accuracy'].items()})
    natural = None
    if natural_result is not None:
        natural = dict(batch_size=natural_result.get('batch_size'), n_examples=natural_result['n_examples'],
                       msa=_pct(natural_result.get('msa_acc')), clean=_pct(natural_result.get('clean_acc')),
                       command=natural_result.get('command', 'unknown'))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    source = Path(template).read_text() if template is not None else TEMPLATE.read_text()
    text = env.from_string(source).render(
        card_data=card_metadata(name, _metrics(result, eps_text), hub_id, dataset_name, license, license_name,
                                base_model),
        verdict=_verdict(result, base_result, control_result, list(comparisons or [])),
        dataset=dict(hub_id=hub_id, name=dataset_name), name=name, repo_id=repo_id,
        base_description=f'`{base_model}`' if base_model else f"a `{model_config.get('architecture')}` model",
        threat_model=result['threat_model'], eps_text=eps_text, n_examples=result['n_examples'], table=table,
        eval_command=result.get('command', 'unknown'),
        base_eval_command=(base_result or {}).get('command'),
        control_eval_command=(control_result or {}).get('command'), comparisons=list(comparisons or []),
        surrogates=', '.join(result['settings']['msa']['surrogates']),
        transfer=', '.join(result['settings']['msa'].get('surrogate_models', [])),
        score_iterates=result['settings']['msa'].get('score_iterates', False),
        batchings=', '.join(result.get('batchings', {})), batch_size=result.get('batch_size'),
        per_batching=per_batching, warnings=result.get('warnings', []), input_size=_input_size(model_config),
        training_description=_training_text(args.get('hpm_cfg', {}), base_model, training_config),
        training_config=(training_config or '').strip(),
        unverified_results=unverified_results, batch_order=order, natural=natural,
        poisoning=_poisoning(poisoning_result, result['threat_model']))
    return text


def load_json(path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())
