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
    assert text.endswith('Without dynamic/apgd-ce: 1 union images no other attack broke (2); backward images about '
                         '140.')
    assert 'Without fc/apgd-ce: 0 union images' in recipe.report(run, without=['fc/*'])
    assert 'nothing (no attack matches)' in recipe.report(run, without=['soft/*'])
