"""A study's tables and figure from its scores: each candidate against its control, image by image."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..report import markdown_table, mean_difference, paired, paired_difference
from .candidates import Candidate

__all__ = ['study_rows', 'study_table', 'seed_summary', 'ranking_text', 'plot_study', 'budget_only', 'budget_trend',
           'plot_budget', 'cost_rows', 'cost_table']


def study_rows(candidates: Sequence[Candidate], scores: Dict[str, dict], base: Optional[dict] = None) -> List[dict]:
    """One row per scored candidate: clean and robust accuracy on the held-out images, and, for every candidate
    that has a scored control, the paired difference to it (robust, in points) with its standard error, 95%
    interval and exact sign-test p. Inference-time candidates are read against the base (``base``)."""
    rows = []
    for c in candidates:
        s = scores.get(c.name)
        if s is None:
            continue
        row = {'name': c.name, 'kind': c.kind, 'budget': c.budget, 'seed': c.seed, 'clean_acc': s['clean_acc'],
               'robust_acc': s['robust_acc'], 'overrides': dict(c.changes),
               'inference': c.hpm, 'eval_batch_size': c.eval_batch_size}
        reference = scores.get(c.control) if c.control else base if c.kind == 'inference' else None
        if reference is not None:
            row['vs'] = c.control or 'base'
            row['difference'] = paired_difference(reference['robust'], s['robust'])
            row['sign_test'] = paired(dict(enumerate(reference['robust'])), dict(enumerate(s['robust'])))['p']
        rows.append(row)
    return rows


def study_table(rows: Sequence[dict]) -> str:
    """The Markdown table of :func:`study_rows`."""
    def pct(v):
        return f'{100 * v:.1f}%'
    body = []
    for r in rows:
        change = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in {**r['overrides'], **r['inference']}.items()
                           if k != 'train.max_steps') or '(defaults)'
        if r['eval_batch_size']:
            change += f", eval batch {r['eval_batch_size']}"
        d = r.get('difference')
        vs = (f"{100 * d['difference']:+.1f} ± {100 * d['se']:.1f} (p = {r['sign_test']:.2g}) vs {r['vs']}"
              if d else '')
        body.append([r['name'], r['kind'], r['budget'], change, pct(r['clean_acc']), pct(r['robust_acc']), vs])
    return markdown_table(['candidate', 'kind', 'steps', 'change', 'clean', 'robust (held-out)',
                           'robust difference, points ± 1 SE (sign test)'], body, 'llrlrrl')


def seed_summary(candidates: Sequence[Candidate], scores: Dict[str, dict]) -> List[dict]:
    """Every scored HPM and inference-time candidate over its scored seeds, best first by mean held-out robust
    accuracy: the seeds, mean clean and robust accuracy and, when every seed's control is scored, the difference to
    the control averaged over the seeds image by image (the images are the sampling unit: the seeds share them), with
    its standard error and 95% interval."""
    groups: Dict[str, List[Candidate]] = {}
    for c in candidates:
        if c.kind != 'control' and c.name in scores:
            groups.setdefault(c.name.split('/')[0], []).append(c)
    out = []
    for name, cs in groups.items():
        row = {'name': name, 'kind': cs[0].kind, 'seeds': [c.seed for c in cs], 'model': cs[0].model,
               'clean_acc': sum(scores[c.name]['clean_acc'] for c in cs) / len(cs),
               'robust_acc': sum(scores[c.name]['robust_acc'] for c in cs) / len(cs)}
        if all(c.control in scores for c in cs):
            if len({len(scores[k]['robust']) for c in cs for k in (c.name, c.control)}) != 1:
                raise ValueError(f'{name}: its seeds and controls were scored on different numbers of images')
            per_seed = [[int(bool(h)) - int(bool(k)) for h, k in zip(scores[c.name]['robust'],
                                                                     scores[c.control]['robust'])] for c in cs]
            row['difference'] = mean_difference([sum(d) / len(d) for d in zip(*per_seed)])
            row['vs'] = sorted({c.control.split('/')[0] for c in cs})
        out.append(row)
    return sorted(out, key=lambda r: -r['robust_acc'])


def ranking_text(summary: Sequence[dict], top: int = 3) -> str:
    """The first ``top`` candidates of :func:`seed_summary` in one paragraph, each with its number of seeds and its
    difference to the control; a candidate there with fewer than two seeds is marked (the study wants two; a
    registered model changed at inference has one training run by construction: a ``model_of`` candidate with the
    same options gives its configuration more seeds)."""
    items = []
    for i, r in enumerate(summary[:top], 1):
        n = len(r['seeds'])
        d = r.get('difference')
        notes = [f"{n} seed{'s' if n > 1 else ''}"]
        if d:
            notes.append(f"{100 * d['difference']:+.1f} ± {100 * d['se']:.1f} points vs {' / '.join(r['vs'])}")
        if n < 2:
            notes.append(f"the registered `{r['model']}`, one training run" if r.get('model')
                         else 'a second seed is due')
        items.append(f"{i}. `{r['name']}` {100 * r['robust_acc']:.1f}% at {100 * r['clean_acc']:.1f}% clean "
                     f"({'; '.join(notes)})")
    return (f'Top {len(items)} by held-out robust accuracy, mean over seeds (difference to the control averaged over '
            'the seeds image by image, ± 1 SE): ' + '; '.join(items) + '.') if items else ''


def plot_study(summary: Sequence[dict], rows: Sequence[dict], path: Path, title: str) -> None:
    """Each candidate's paired difference to its budget-matched control (held-out robust accuracy, points), best
    first: the mean over its seeds with its 95% interval (:func:`seed_summary`), each seed's own difference as a
    dot (``rows``, :func:`study_rows`), a line at 0 (the control). One row per candidate, named on the axis, so no
    label overlaps another. Candidates without a scored control are left out (the table lists them). A PNG at
    ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    shown = sorted((r for r in summary if r.get('difference')), key=lambda r: r['difference']['difference'])
    per_seed: Dict[str, List[float]] = {}
    for r in rows:
        if r.get('difference') and r['kind'] != 'control':
            per_seed.setdefault(r['name'].split('/')[0], []).append(100 * r['difference']['difference'])
    fig, ax = plt.subplots(figsize=(7.2, 1.2 + 0.28 * max(len(shown), 1)))
    for i, r in enumerate(shown):
        d = r['difference']
        low, high = (100 * v for v in d['ci95'])
        colour = 'tab:red' if high < 0 else 'tab:green' if low > 0 else 'tab:grey'
        ax.plot([low, high], [i, i], color=colour, linewidth=2)
        ax.plot([100 * d['difference']], [i], 'o', color=colour)
        dots = per_seed.get(r['name'], [])
        if len(dots) > 1:
            ax.plot(dots, [i] * len(dots), '|', color='black', markersize=8)
    ax.axvline(0, color='black', linewidth=1)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{r['name']} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})" for r in shown],
                       fontsize=8)
    ax.set_xlabel('held-out robust accuracy minus the control, points (95% interval; | each seed)', fontsize=9)
    ax.set_xlim(right=max(0.5, ax.get_xlim()[1]))  # the control's line never at the edge
    ax.set_title(title, fontsize=10)
    ax.grid(axis='x', alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_only(c: Candidate) -> bool:
    """Whether ``c`` is fine-tuned with its own run and nothing but its step budget changed: a budget candidate
    (kind ``hpm``) or the control of one."""
    return c.kind in ('hpm', 'control') and c.run is None and set(c.changes) <= {'train.max_steps'}


def budget_trend(candidates: Sequence[Candidate], summary: Sequence[dict]) -> List[dict]:
    """The budget candidates (HPM's configuration with nothing but its step budget changed, :func:`budget_only`)
    that have scored controls, fewest steps first: :func:`seed_summary`'s rows with their ``budget``."""
    plain = {c.name.split('/')[0]: c.budget for c in candidates if c.kind == 'hpm' and budget_only(c)}
    return sorted(({**r, 'budget': plain[r['name']]} for r in summary if r['name'] in plain and r.get('difference')),
                  key=lambda r: r['budget'])


def plot_budget(trend: Sequence[dict], rows: Sequence[dict], path: Path) -> None:
    """HPM's held-out robust accuracy minus its budget-matched control against the fine-tuning budget (optimiser
    steps, log scale): the mean over seeds with its 95% interval (:func:`budget_trend`), each seed's own difference
    as a dot (``rows``), a line at 0 (the control). A PNG at ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    budgets = [r['budget'] for r in trend]
    means = [100 * r['difference']['difference'] for r in trend]
    low = [m - 100 * r['difference']['ci95'][0] for m, r in zip(means, trend)]
    high = [100 * r['difference']['ci95'][1] - m for m, r in zip(means, trend)]
    ax.errorbar(budgets, means, yerr=[low, high], fmt='o-', color='tab:blue', capsize=4,
                label='mean over seeds, 95% interval')
    names = {r['name']: r['budget'] for r in trend}
    dots = [(names[r['name'].split('/')[0]], 100 * r['difference']['difference']) for r in rows
            if r['name'].split('/')[0] in names and r.get('difference')]
    if dots:
        ax.plot(*zip(*dots), '_', color='black', markersize=10, label='each seed')
    ax.axhline(0, color='black', linewidth=1)
    ax.set_xscale('log')
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel('fine-tuning budget, optimiser steps (each against the control of the same budget and seed)',
                  fontsize=8)
    ax.set_ylabel('robust accuracy minus control, points', fontsize=8)
    ax.set_title('HPM against its budget-matched control by budget (held-out)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_rows(candidates: Sequence[Candidate], scores: Dict[str, dict]) -> List[dict]:
    """What the budget candidates and their controls cost (:func:`budget_only`), by budget and kind: the wall
    seconds of each timed fine-tune and scoring as the machine ran them, and the fine-tunes that shared the cores
    (``jobs``; unknown for scores made before it was recorded)."""
    groups: Dict[tuple, List[dict]] = {}
    for c in candidates:
        s = scores.get(c.name)
        if s is not None and budget_only(c):
            groups.setdefault((c.budget, c.kind), []).append(s)
    out = []
    for (budget, kind), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != 'hpm')):
        train = [s['train_seconds'] for s in group if s.get('train_seconds') is not None]
        score = [s['score_seconds'] for s in group if s.get('score_seconds') is not None]
        out.append({'budget': budget, 'kind': kind, 'models': len(group), 'train_seconds': train,
                    'score_seconds': score, 'jobs': sorted({s['jobs'] for s in group if s.get('jobs')})})
    return out


def cost_table(rows: Sequence[dict]) -> str:
    """The Markdown table of :func:`cost_rows`: minutes, the mean over the timed models (and how many were)."""
    def minutes(values):
        return f'{sum(values) / len(values) / 60:.1f} ({len(values)})' if values else 'unknown'
    return markdown_table(
        ['steps', 'model', 'scored', 'fine-tune, minutes (timed)', 'scoring, minutes (timed)', 'fine-tunes at a time'],
        [[r['budget'], 'HPM' if r['kind'] == 'hpm' else 'control', r['models'], minutes(r['train_seconds']),
          minutes(r['score_seconds']), ', '.join(map(str, r['jobs'])) or 'unknown'] for r in rows], 'rlrrrl')
