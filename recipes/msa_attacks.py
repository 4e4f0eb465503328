"""Which attack of an MSA run broke which image, and what leaving some out would lose, from its unit files.

    python recipes/msa_attacks.py --run results/fashion_mnist/eval_hpm_msa4_1000 \\
        --autoattack results/fashion_mnist/eval_base_1000 --without 'fc/*' 'static/*' 'dynamic/apgd-t[6-9]'

An attack is a candidate's name without its ``:best-iterate`` / ``:iterates`` suffix (``dynamic/apgd-t5``). It is
credited with the images its candidates broke that no earlier candidate had (the per-sample union as it stood) and,
through a batch-dependent view, with every image some whole batch it evaluated broke (its ``:iterates``: such a view
attacks the whole batch whatever ran before). The combinations only reuse images the attacks made and are credited
to none. The images in the union that the realised batch keeps correct are listed with whether a whole candidate
batch broke them (not only an attack's iterates) and whether an earlier realised batch did. With ``--without``
(shell-style patterns): the union images that only left-out attacks broke, and the
backward images the left-out attacks cost (each stage's recorded cost split evenly over its attacks) against the
run's and, with ``--autoattack``, a standard AutoAttack run's on the same images.

An estimate for choosing a cheaper stage set, not a measurement of one: leaving an attack out changes the random
starts of the attacks after it and, under the cascade, what they attack, and the realised batch is built anew. The
set chosen is measured by running it (``recipes/evaluate.py``, then ``recipes/msa_parts.py``).
"""
import argparse
import fnmatch
from collections import Counter, defaultdict
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--run', type=Path, required=True, help='an evaluate.py --out folder (an MSA run)')
    p.add_argument('--without', nargs='*', default=[], metavar='PATTERN',
                   help="attacks to leave out, e.g. 'fc/*' 'dynamic/apgd-t[6-9]'")
    p.add_argument('--autoattack', type=Path, help='a standard AutoAttack run on the same images (the cost baseline)')
    p.add_argument('--batching', default='default')
    p.add_argument('--n', type=int, default=None, help='the first N examples (whole units); default: all finished')
    return p.parse_args(argv)


def attack_of(candidate: str) -> str:
    """The attack a candidate belongs to: ``dynamic/apgd-t5:iterates`` -> ``dynamic/apgd-t5``."""
    return candidate.split(':')[0]


def credits(units) -> dict:
    """Image index -> the attacks credited with breaking it (see the module's docstring), over ``units``."""
    from timm_hpm.eval.stages import COMBINED, candidate_stage, is_per_sample_union
    out = defaultdict(set)
    for u in units:
        union = list(u['clean'])
        for name in u['stages']:
            correct = u['candidates'][name]
            if candidate_stage(name) != COMBINED:
                fresh = union if not is_per_sample_union(name) else u['clean']
                for i, was, now in zip(u['indices'], fresh, correct):
                    if was and not now:
                        out[i].add(attack_of(name))
            union = [a and b for a, b in zip(union, correct)]
    return out


def gap(units) -> dict:
    """The images in the union that the realised batch keeps correct, and of them those some whole candidate batch
    broke (not only an attack's per-sample union of iterates) and those an earlier realised batch broke (the running
    batch, replayed from the candidates in the order they ran: one is taken when it lowers the correct count)."""
    from timm_hpm.eval.results import realised_replay
    from timm_hpm.eval.stages import is_per_sample_union
    out = {'gap': [], 'whole_batch': [], 'earlier_realised': []}
    for u in units:
        history = [correct for _, correct, _, taken in realised_replay(u) if taken]
        whole = [c for n, c in u['candidates'].items() if not is_per_sample_union(n)]
        for k, i in enumerate(u['indices']):
            if u['realised'][k] and not u['union'][k]:
                out['gap'].append(i)
                if any(not c[k] for c in whole):
                    out['whole_batch'].append(i)
                if any(not c[k] for c in history):
                    out['earlier_realised'].append(i)
    return out


def attack_costs(units) -> dict:
    """Attack -> backward images: each stage's recorded cost split evenly over the attacks it ran."""
    from timm_hpm.eval.stages import candidate_stage
    cost = Counter()
    for u in units:
        attacks = list(dict.fromkeys(attack_of(n) for n in u['stages']))
        for stage, passes in u['stage_passes'].items():
            mine = [a for a in attacks if candidate_stage(a) == stage] or [stage]
            for a in mine:
                cost[a] += passes['backward_images'] / len(mine)
    return cost


def report(run: Path, without=(), autoattack=None, batching='default', n=None) -> str:
    from timm_hpm.eval.results import finished_units, stage_breaks
    from timm_hpm.report import markdown_table
    units = finished_units(run / 'attack', batching, n)
    if not units or any('stage_passes' not in u for u in units):
        raise SystemExit(f'{run}: no finished unit of batching {batching!r} that records its stages\' cost')
    broke, cost = credits(units), attack_costs(units)
    attacks = list(cost)
    alone = Counter(next(iter(a)) for a in broke.values() if len(a) == 1)
    rows = [[f'`{a}`', sum(a in b for b in broke.values()), alone.get(a, 0), f'{cost[a]:,.0f}'] for a in attacks]
    text = markdown_table(['attack', 'images it broke (credited)', 'broken by it alone', 'backward images'], rows,
                          'lrrr')
    total = sum(u['passes']['backward_images'] for u in units)
    ref = stage_breaks(autoattack / 'attack', 'default', n)['backward_images'] if autoattack else None
    ratio = (lambda b: f' = x{b / ref:.2f} AutoAttack') if ref else (lambda b: '')
    text += (f"\n\n{len(broke)} images in the union of {sum(len(u['indices']) for u in units)}; backward images "
             f'{total:,}{ratio(total)}.')
    lost = gap(units)
    text += (f"\n{len(lost['gap'])} union images the realised batches keep correct "
             f"({', '.join(map(str, lost['gap'])) or 'none'}): {len(lost['whole_batch'])} broken by a whole candidate "
             f"batch, {len(lost['earlier_realised'])} by an earlier realised batch "
             f"({', '.join(map(str, lost['earlier_realised'])) or 'none'}).")
    if without:
        left_out = [a for a in attacks if any(fnmatch.fnmatchcase(a, p) for p in without)]
        lost = sorted(i for i, a in broke.items() if a <= set(left_out))
        saved = sum(cost[a] for a in left_out)
        text += (f"\nWithout {', '.join(left_out) or 'nothing (no attack matches)'}: {len(lost)} union images no "
                 f"other attack broke ({', '.join(map(str, lost)) or 'none'}); backward images about "
                 f'{total - saved:,.0f}{ratio(total - saved)}.')
    return text


def main(argv=None):
    args = parse_args(argv)
    print(report(args.run, args.without, args.autoattack, args.batching, args.n))


if __name__ == '__main__':
    main()
