"""MSA's stages as objects (timm_hpm.eval.msa_stages) and the command-line options generated from the configurations'
fields (timm_hpm.cli.config_args): a stage defined here, outside the library, runs as one class and one line in the
list, its candidates scored, its breaks and cost counted, its recorded state resumed; the default stages keep their
order; every option of MSAConfig and PoisonConfig is a flag of recipes/evaluate.py whose defaults give the
configurations' own."""
import argparse
import copy
import dataclasses
from typing import Optional, Sequence

import pytest
import torch
import torch.nn as nn

import timm_hpm
from timm_hpm.eval import MSAConfig, ModelView, PassCounter, PoisonConfig, attack_batch, evaluate
from timm_hpm.eval.msa_stage import StageContext
from timm_hpm.eval.msa_stages import (DEFAULT_STAGES, AutoAttackStage, Candidate, CompletionStage, Stage,
                                     SurrogateStage)
from timm_hpm.eval.progress import StageProgress
from timm_hpm.eval.realised import RealisedBatch

K, B = 4, 8
FAST = dict(apgd_iters=2, n_target_classes=1, target_n_target_classes=1, autoattack_iters=2, square_queries=5,
            combine_rounds=1)


class ShiftStage(Stage):
    """A stage outside the library: one FGSM step through the target (one forward and backward of the batch), and
    a note it records beside the candidates (kept in the stage checkpoint, for a resume)."""
    name = 'shift'
    outputs = {'shift_note': None}

    def run(self, ctx):
        x = ctx.batch.x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(ctx.target(x), ctx.batch.y, reduction='sum')
        grad, = torch.autograd.grad(loss, x)
        x_adv = (ctx.batch.x + ctx.cfg.eps * grad.sign()).clamp(0, 1)
        ctx.outputs['shift_note'] = 'ran'
        yield Candidate(self.candidate('fgsm'), x_adv, ctx.active())


def linear_problem(seed=0):
    """A batch-independent linear classifier on 8x8 images, the labels its own predictions (all clean-correct)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, K)).eval()
    x = torch.rand(B, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def linear_hpm_problem(seed=0):
    """The linear classifier with an HPM head (prototypes initialised from the batch, train mode), its batch and the
    FC head's predictions as labels."""
    torch.manual_seed(seed)
    model = timm_hpm.convert_to_hpm(nn.Sequential(nn.Flatten(), nn.Linear(64, K)))
    x = torch.rand(B, 1, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        y = model.hpm_head.fc_forward(feats).argmax(1)
        model.hpm_head.init_prototypes_([(feats, y)])
    return model, x, y


def shift_only(model, counter, **cfg):
    """The target and a config under which no default stage runs (no AutoAttack, no surrogate)."""
    target = ModelView(model, None, counter, batch_dependent=False)
    return target, MSAConfig(eps=0.3, autoattack=False, surrogates=(), **FAST, **cfg)


def test_an_extra_stage_is_one_class_and_one_line_in_the_list(monkeypatch):
    model, x, y = linear_problem()
    counter = PassCounter()
    target, cfg = shift_only(model, counter)
    plain = attack_batch(target, {}, x, y, cfg, seed=0, num_classes=K)
    assert plain['realised'] == plain['clean'] and 'shift_note' not in plain
    stage = ShiftStage()
    monkeypatch.setattr(ShiftStage, 'for_run', classmethod(lambda cls, cfg, target, surrogates: [stage]))
    DEFAULT_STAGES.append(ShiftStage)  # the one line
    try:
        result = attack_batch(target, {}, x, y, cfg, seed=0, num_classes=K)
    finally:
        DEFAULT_STAGES.remove(ShiftStage)
    assert 'shift/fgsm' in result['candidates'] and result['stages'] == ['shift/fgsm']
    broken = sum(result['clean']) - sum(result['candidates']['shift/fgsm'])
    assert broken > 0 and sum(result['realised']) == sum(result['clean']) - broken  # the realised batch took it
    assert sum(result['union']) == sum(result['realised'])
    assert stage.breaks == broken and result['shift_note'] == 'ran'
    assert list(result['stage_passes']) == ['shift', 'combined']
    # the same through the stages argument, without touching the list
    again = attack_batch(target, {}, x, y, cfg, seed=0, num_classes=K, stages=[*DEFAULT_STAGES, ShiftStage])
    assert {k: v for k, v in again.items() if 'seconds' not in k and k != 'x_adv'} == \
        {k: v for k, v in result.items() if 'seconds' not in k and k != 'x_adv'}


def test_a_stage_records_its_own_cost():
    """The only stage's passes: the clean batch's forward (the first stage's), its FGSM step's forward and backward
    and the scoring of its candidate; the combinations made none (nothing left to combine)."""
    model, x, y = linear_problem()
    counter = PassCounter()
    target, cfg = shift_only(model, counter)
    result = attack_batch(target, {}, x, y, cfg, seed=0, num_classes=K, stages=[ShiftStage])
    assert result['stage_passes']['shift'] == {'forward_images': 3 * B, 'backward_images': B}
    assert result['stage_passes']['combined'] == {'forward_images': 0, 'backward_images': 0}
    assert counter.as_dict() == {'forward_images': 3 * B, 'backward_images': B}
    assert set(result['stage_seconds']) == {'shift', 'combined'}


class MemoryCheckpoint:
    """A stage checkpoint in memory (the runner's is run_folder.StageCheckpoint), stopping the batch once."""

    def __init__(self, stop_after):
        self.saved, self.stop_after = None, stop_after

    def load(self):
        return copy.deepcopy(self.saved)

    def save(self, tensors, meta):
        self.saved = copy.deepcopy((tensors, meta))
        if meta['done'] == self.stop_after:
            self.stop_after = None
            raise KeyboardInterrupt('stopped')


def test_an_extra_stage_resumes_with_what_it_recorded():
    model, x, y = linear_problem()
    target, cfg = shift_only(model, PassCounter())
    stages = [ShiftStage, AutoAttackStage]
    cfg = dataclasses.replace(cfg, autoattack=True)
    reference = attack_batch(target, {}, x, y, cfg, seed=3, num_classes=K, stages=stages)
    checkpoint = MemoryCheckpoint(stop_after=['shift'])
    with pytest.raises(KeyboardInterrupt):
        attack_batch(target, {}, x, y, cfg, seed=3, num_classes=K, stages=stages, checkpoint=checkpoint)
    assert checkpoint.saved[1]['shift_note'] == 'ran'
    resumed = attack_batch(target, {}, x, y, cfg, seed=3, num_classes=K, stages=stages, checkpoint=checkpoint)

    def stable(r):
        return {k: v for k, v in r.items() if 'seconds' not in k and k not in ('x_adv', 'passes_before')}
    assert stable(resumed) == stable(reference) and resumed['shift_note'] == 'ran'
    assert list(resumed['stage_passes']) == ['shift', 'autoattack', 'combined']


def test_the_default_stages_and_their_order():
    """AutoAttack on the target, then each surrogate in the configured order (the head's modes, then the other
    models); the names are those the unit files hold."""
    assert DEFAULT_STAGES == [AutoAttackStage, SurrogateStage, CompletionStage]
    model, x, y = linear_hpm_problem()
    model.eval()
    counter = PassCounter()
    target = ModelView(model, 'dynamic', counter)
    surrogates = {'static': ModelView(model, 'static', counter), 'fc': ModelView(model, 'fc', counter),
                  'base': ModelView(nn.Sequential(nn.Flatten(), nn.Linear(64, K)).eval(), None, counter,
                                    batch_dependent=False)}
    cfg = MSAConfig(eps=0.5, surrogates=('static', 'fc'), surrogate_models=('base',), cascade=False, **FAST)
    plan = [s for kind in DEFAULT_STAGES for s in kind.for_run(cfg, target, surrogates)]
    assert [(s.name, s.through) for s in plan] == [('autoattack', 'target'), ('static', 'static'), ('fc', 'fc'),
                                                   ('base', 'base')]
    result = attack_batch(target, surrogates, x, y, cfg, seed=0, num_classes=K)
    assert list(result['stage_passes']) == ['autoattack', 'static', 'fc', 'base', 'combined']
    assert sum(p['backward_images'] for p in result['stage_passes'].values()) == counter.backward
    assert all(p['backward_images'] > 0 for s, p in result['stage_passes'].items() if s != 'combined')
    completing = dataclasses.replace(cfg, completion_rounds=1)  # the completion: after the surrogates, before combined
    plan = [s for kind in DEFAULT_STAGES for s in kind.for_run(completing, target, surrogates)]
    assert [(s.name, s.through) for s in plan][-2:] == [('base', 'base'), ('completion', 'target')]
    result = attack_batch(target, surrogates, x, y, completing, seed=0, num_classes=K)
    assert list(result['stage_passes'])[-2:] == ['completion', 'combined']


def test_an_extra_stage_reaches_the_runners_results(tmp_path, monkeypatch):
    """Through timm_hpm.eval.evaluate (the runner): the appended stage's candidates are in the run's figures."""
    model, x, y = linear_hpm_problem()
    cfg = MSAConfig(eps=0.3, autoattack=False, surrogates=('fc',), **FAST)
    DEFAULT_STAGES.append(ShiftStage)
    try:
        result = evaluate(model.eval(), x, y, cfg, tmp_path / 'run', batch_size=B, batchings=('default',),
                          progress=False)
    finally:
        DEFAULT_STAGES.remove(ShiftStage)
    assert list(result['per_surrogate_acc']) == ['fc', 'combined', 'shift']  # a stage the settings do not name: last



def worst_case_linear(model, x, y, eps):
    """Closed form for a linear classifier on images in [0, 1]: each sample's smallest margin over the wrong classes
    under its worst Linf perturbation of radius ``eps`` in the box (per wrong class r, every pixel moved by eps
    against w_y - w_r, clipped to [0, 1]): > 0 where the sample is robust."""
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    flat = x.flatten(1)
    margins = []
    for r in range(K):
        d = weight[y] - weight[r]
        worst = flat + (-eps * d.sign()).clamp(min=-flat, max=1 - flat)
        m = (worst * d).sum(1) + bias[y] - bias[r]
        margins.append(torch.where(y == r, torch.full_like(m, float('inf')), m))
    return torch.stack(margins, 1).min(1).values


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_completion_alone_finds_the_closed_form_robust_set_of_a_linear_model(seed):
    """On a linear model (every sample's worst case known exactly), the completion through the target as the only
    stage breaks exactly the samples that are not robust at eps: none that is (the ball and the box hold), all
    that are not (the attack is strong enough here)."""
    model, x, y = linear_problem(seed)
    radii = torch.tensor([0.0] * B)  # each sample's critical radius, by bisection on the closed form
    for i in range(B):
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if worst_case_linear(model, x[i:i + 1], y[i:i + 1], mid) > 0 else (low, mid)
        radii[i] = low
    order = radii.sort().values
    eps = float(order[B // 2 - 1] + order[B // 2]) / 2  # half the samples robust, none within 1e-4 of the boundary
    assert (radii - eps).abs().min() > 1e-4
    robust = worst_case_linear(model, x, y, eps) > 0
    target = ModelView(model, None, PassCounter(), batch_dependent=False)
    cfg = MSAConfig(eps=eps, autoattack=False, surrogates=(), apgd_iters=30, combine_rounds=0, completion_rounds=1)
    result = attack_batch(target, {}, x, y, cfg, seed=seed, num_classes=K)
    assert result['realised'] == robust.tolist() and result['union'] == robust.tolist()
    assert list(result['stage_passes']) == ['completion', 'combined']


def _context(model, x, y, cfg, mode='dynamic'):
    batch = RealisedBatch(ModelView(model, mode), x, y)
    return batch, StageContext(batch, batch.target, cfg, 0, K, torch.Generator().manual_seed(0),
                               StageProgress(enabled=False))


def test_the_completion_moves_only_the_still_correct_samples_from_the_images_that_broke_them():
    """The completion's start (0 iterations: its candidate is its start): the samples the realised batch
    misclassifies keep their images, a still-correct sample an earlier candidate broke starts from the first image
    that broke it, the other still-correct ones from their realised images; every image within eps and [0, 1]."""
    model, x, y = linear_hpm_problem()
    model.eval()
    cfg = MSAConfig(eps=0.3, autoattack=False, surrogates=(), apgd_iters=1, completion_rounds=1)
    batch, ctx = _context(model, x, y, cfg)
    batch.clean[:] = True
    realised = (x + 0.3 * torch.randn_like(x).sign()).clamp(0, 1)
    batch.x_adv, batch.correct = realised, torch.tensor([False, False, True, True, True, True, True, True])
    first, second = (x - 0.2).clamp(0, 1), (x + 0.1).clamp(0, 1)
    batch.breaks = [(torch.tensor([0, 2]), first[[0, 2]]), (torch.tensor([2, 3]), second[[2, 3]])]
    cfg.apgd_iters = 0  # the start alone (a config refuses 0 iterations when made; the stage does not check again)
    candidates = list(CompletionStage().run(ctx))
    assert [c.name for c in candidates] == ['completion/apgd-round1'] * 2 and candidates[1].iterates is not None
    images = candidates[0].images
    assert torch.equal(images[:2], realised[:2])  # misclassified: frozen (the start is projected onto the ball: equal to
    # within rounding for the others)
    assert torch.allclose(images[2], first[2], atol=1e-6) and torch.allclose(images[3], second[3], atol=1e-6)
    assert torch.allclose(images[4:], realised[4:], atol=1e-6)  # the others: their realised images
    assert torch.equal(candidates[0].replace, batch.correct)


def test_the_completion_keeps_every_candidate_within_the_threat_model_and_never_raises_the_realised_count():
    model, x, y = linear_hpm_problem(seed=1)
    model.eval()
    counter = PassCounter()
    target = ModelView(model, 'dynamic', counter)
    surrogates = {'fc': ModelView(model, 'fc', counter, batch_dependent=False)}
    cfg = MSAConfig(eps=0.1, autoattack=False, surrogates=('fc',), apgd_iters=5, n_target_classes=1,
                    combine_rounds=0)
    before = attack_batch(target, surrogates, x, y, cfg, seed=0, num_classes=K)
    after = attack_batch(target, surrogates, x, y, dataclasses.replace(cfg, completion_rounds=2), seed=0,
                         num_classes=K)
    assert {k: v for k, v in after['candidates'].items() if not k.startswith('completion/')} == before['candidates']
    assert sum(after['realised']) <= sum(before['realised'])
    assert set(k for k in after['candidates'] if k.startswith('completion/')) >= {
        'completion/apgd-round1', 'completion/apgd-round1:iterates'}
    assert (after['x_adv'] - x).abs().max() <= 0.1 + 1e-6 and 0 <= after['x_adv'].min() <= after['x_adv'].max() <= 1
    realised = torch.tensor(after['realised'])
    assert torch.equal(realised, accuracy_of(target, after['x_adv'], y) & torch.tensor(after['clean']))


def accuracy_of(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


# --- the command line generated from the configurations' fields ---------------------------------------------------

def _evaluate_cli():
    from _recipes import load_recipe
    return load_recipe('evaluate')


BASE = ['--model', 'm', '--dataset', 'synthetic', '--eps', '0.1']


def test_every_option_of_the_configurations_is_a_flag_whose_defaults_are_the_configurations():
    from timm_hpm.cli.config_args import config_from_args, config_options
    cli = _evaluate_cli()
    parser_flags = set()
    orig = argparse.ArgumentParser.parse_args

    def grab(self, *args, **kwargs):
        parser_flags.update(self._option_string_actions)
        return orig(self, *args, **kwargs)
    argparse.ArgumentParser.parse_args = grab
    try:
        args = cli.parse_args(BASE)
    finally:
        argparse.ArgumentParser.parse_args = orig
    for config in (MSAConfig, PoisonConfig):
        assert {f.metadata['flag'] for f in config_options(config)} <= parser_flags
    # every field has a flag but these (set in Python only), so that a new field is not forgotten
    assert {f.name for f in dataclasses.fields(MSAConfig)} - {f.name for f in config_options(MSAConfig)} == \
        {'autoattack', 'autoattack_version', 'autoattack_attacks'}
    assert [f.name for f in dataclasses.fields(PoisonConfig)] == [f.name for f in config_options(PoisonConfig)]
    assert config_from_args(MSAConfig, args, eps=0.1) == MSAConfig(eps=0.1)
    assert config_from_args(PoisonConfig, args, eps=0.1) == PoisonConfig(eps=0.1)
    assert cli.msa_config(args, 0.1) == MSAConfig(eps=0.1)
    flipped = cli.parse_args(BASE + ['--no-cascade', '--surrogates', 'fc', '--apgd-iters', '7', '--no-poison-anneal',
                                     '--poison-objectives', 'top_m', 'margin_sum', '--norm', 'L2'])
    assert cli.msa_config(flipped, 0.1) == MSAConfig(eps=0.1, cascade=False, surrogates=('fc',), apgd_iters=7,
                                                     norm='L2')
    assert cli.poison_options(flipped, 0.1)['anneal'] is False
    assert cli.poison_options(flipped, 0.1)['objectives'] == ('top_m', 'margin_sum')


@pytest.mark.parametrize('extra, flag', [(['--apgd-iters', '0'], '--apgd-iters'),
                                         (['--combine-rounds', '-1'], '--combine-rounds'),
                                         (['--surrogates', 'nope'], '--surrogates'),
                                         (['--protocol', 'poison', '--poison-restarts', '0'], '--poison-restarts'),
                                         (['--protocol', 'poison', '--poison-objectives', 'x'], '--poison-objectives')])
def test_an_invalid_value_is_refused_naming_its_flag(extra, flag):
    cli = _evaluate_cli()
    with pytest.raises(ValueError, match=flag):
        cli.check_options(cli.parse_args(BASE + extra), 0.1)


def test_a_value_of_the_wrong_type_is_refused_by_the_parser_naming_its_flag(capsys):
    with pytest.raises(SystemExit):
        _evaluate_cli().parse_args(BASE + ['--apgd-iters', 'many'])
    assert '--apgd-iters' in capsys.readouterr().err


@dataclasses.dataclass
class ToyConfig:
    """Every kind of field the generator reads."""
    size: int = dataclasses.field(default=3, metadata={'flag': '--size', 'help': 'a count'})
    scale: Optional[float] = dataclasses.field(default=None, metadata={'flag': '--scale', 'help': 'or None'})
    names: Sequence[str] = dataclasses.field(default=('a', 'b'), metadata={'flag': '--names', 'help': 'names'})
    extra: Sequence[str] = dataclasses.field(default=(), metadata={'flag': '--extra', 'help': 'repeatable',
                                                                    'action': 'append', 'default': None})
    fast: bool = dataclasses.field(default=False, metadata={'flag': '--fast', 'help': 'a switch'})
    checked: bool = dataclasses.field(default=True, metadata={'flag': '--no-checked', 'help': 'off',
                                                              'negated': True})
    both: bool = dataclasses.field(default=True, metadata={'flag': '--both', 'help': 'on or off',
                                                           'action': 'boolean_optional'})
    hidden: str = 'python only'


def test_the_generator_on_every_kind_of_field():
    from timm_hpm.cli.config_args import add_config_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig, 'toy')
    assert config_from_args(ToyConfig, parser.parse_args([])) == ToyConfig()
    args = parser.parse_args(['--size', '5', '--scale', '0.5', '--names', 'c', '--extra', 'x', '--extra', 'y',
                              '--fast', '--no-checked', '--no-both'])
    assert config_from_args(ToyConfig, args, hidden='set') == ToyConfig(5, 0.5, ('c',), ('x', 'y'), True, False,
                                                                        False, 'set')
    assert parser.parse_args([]).names == ['a', 'b'] and not hasattr(args, 'hidden')
    with pytest.raises(SystemExit):
        parser.parse_args(['--size', 'x'])
