"""recipes/msa_attacks.py: which attack of an MSA run is credited with which break, and what leaving attacks out
would lose and save, on a hand-made run whose answer is known."""
from _recipes import load_recipe

from timm_hpm.eval.run_header import make_header
from timm_hpm.eval.unit_store import UNITS_FILE, write_header, write_unit

T, F = True, False


def _run(tmp_path):
    """One unit of four images (the last clean-wrong): AutoAttack breaks 0, fc's APGD-CE then 1, the dynamic view's
    APGD-CE nothing new as a batch but 1 and 2 in the whole batches it evaluated; the combination reuses them."""
    attack = tmp_path / 'run' / 'attack'
    attack.mkdir(parents=True)
    write_header(attack / UNITS_FILE, make_header({'protocol': 'msa'}))
    candidates = {'autoattack': [F, T, T, F], 'fc/apgd-ce': [F, F, T, F], 'dynamic/apgd-ce': [F, F, T, F],
                  'dynamic/apgd-ce:iterates': [T, F, F, F], 'combined/round1': [F, F, F, F]}
    write_unit(attack, 'default', 0, {
        'indices': [0, 1, 2, 3], 'clean': [T, T, T, F], 'candidates': candidates, 'stages': list(candidates),
        'realised': [F, F, F, F], 'union': [F, F, F, F], 'seconds': 1.0,
        'passes': {'forward_images': 500, 'backward_images': 200},
        'stage_passes': {'autoattack': {'forward_images': 300, 'backward_images': 100},
                         'fc': {'forward_images': 80, 'backward_images': 40},
                         'dynamic': {'forward_images': 120, 'backward_images': 60},
                         'combined': {'forward_images': 0, 'backward_images': 0}}})
    return tmp_path / 'run'


def test_credits_costs_and_what_leaving_out_loses(tmp_path):
    recipe = load_recipe('msa_attacks')
    run = _run(tmp_path)
    from timm_hpm.eval.unit_store import read_units
    units = list(read_units(run / 'attack').values())
    # the first breaker in the union, and a batch-dependent view's iterates whatever broke the image before
    assert dict(recipe.credits(units)) == {0: {'autoattack'}, 1: {'fc/apgd-ce', 'dynamic/apgd-ce'},
                                           2: {'dynamic/apgd-ce'}}
    assert dict(recipe.attack_costs(units)) == {'autoattack': 100, 'fc/apgd-ce': 40, 'dynamic/apgd-ce': 60,
                                                'combined/round1': 0}
    text = recipe.report(run, without=['dynamic/*'])
    assert '| `dynamic/apgd-ce` | 2 | 1 | 60 |' in text and '| `fc/apgd-ce` | 1 | 0 | 40 |' in text
    assert '3 images in the union of 4; backward images 200.' in text
    assert '0 union images the realised batches keep correct (none): 0 broken by a whole candidate batch, 0 by an ' \
        'earlier realised batch (none).' in text
    assert text.endswith('Without dynamic/apgd-ce: 1 union images no other attack broke (2); backward images about '
                         '140.')
    assert 'Without fc/apgd-ce: 0 union images' in recipe.report(run, without=['fc/*'])
    assert 'nothing (no attack matches)' in recipe.report(run, without=['soft/*'])


def test_the_gap_between_the_realised_batch_and_the_union(tmp_path):
    """Images 10-14, all clean-correct. AutoAttack's batch breaks 10 and 11 (taken); fc's breaks 12-14 and keeps 10
    and 11 (taken: two correct instead of three); the dynamic view's iterates break 10; its APGD-T batch breaks 10
    and 12 (not taken). The realised batch keeps 10 and 11 correct, both broken by an earlier realised batch. Then
    with AutoAttack breaking 14 alone: 10 is broken by a whole batch (APGD-T's), 11 only by the iterates."""
    recipe = load_recipe('msa_attacks')
    candidates = {'autoattack': [F, F, T, T, T], 'fc/apgd-ce': [T, T, F, F, F],
                  'dynamic/apgd-ce:iterates': [F, T, T, T, T], 'dynamic/apgd-t1': [F, T, F, T, T]}
    unit = {'indices': [10, 11, 12, 13, 14], 'clean': [T] * 5, 'candidates': candidates, 'stages': list(candidates),
            'realised': [T, T, F, F, F], 'union': [F, F, F, F, F]}
    assert recipe.gap([unit]) == {'gap': [10, 11], 'whole_batch': [10, 11], 'earlier_realised': [10, 11]}
    unit['candidates'] = dict(candidates, autoattack=[T, T, T, T, F], **{'dynamic/apgd-ce:iterates': [F, F, T, T, T]})
    assert recipe.gap([unit]) == {'gap': [10, 11], 'whole_batch': [10], 'earlier_realised': []}
