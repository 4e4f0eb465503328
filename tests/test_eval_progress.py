"""What a user sees of a long evaluation: each MSA stage with its attack iterations, and an eval.md that says when
the attack budget was reduced."""
import torch

import timm
import timm_hpm  # noqa: F401  (registers the models)
from timm_hpm.eval import MSAConfig
from timm_hpm.eval.msa import attack_batch
from timm_hpm.eval.progress import StageProgress
from timm_hpm.eval.results import format_table, reduced_budget
from timm_hpm.eval.views import ModelView, hpm_views


class Recorder(StageProgress):
    """Records the stages and every tick (before the bar's cap)."""

    def __init__(self):
        super().__init__(enabled=False)
        self.stages, self.ticks = [], {}

    def stage(self, name, total=None):
        self.stages.append((name, total))
        self.ticks[name] = 0

    def tick(self, n=1):
        self.ticks[self.stages[-1][0]] += n


def test_each_stage_is_shown_with_its_attack_iterations():
    torch.manual_seed(0)
    model = timm.create_model('hpm_small_cnn', num_classes=4).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6) % 4
    cfg = MSAConfig(eps=0.1, surrogates=('fc', 'dynamic'), apgd_iters=3, n_target_classes=1,
                    target_n_target_classes=2, autoattack=False, combine_rounds=1,
                    cascade=False)  # no cascade: every stage attacks, whatever the earlier ones broke
    target, surrogates = hpm_views(model, cfg.surrogates, None)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct on the clean batch
    rec = Recorder()
    attack_batch(target, surrogates, x, y, cfg, seed=0, num_classes=4, progress=rec)
    names = [name for name, _ in rec.stages]
    assert names == ['APGD-CE/T via fc', 'APGD-CE/T via dynamic', "combinations of every stage's breaks"]
    totals = dict(rec.stages)
    # APGD-CE and APGD-T (1 target through fc; 2 through the target itself), each its start and 3 iterations
    assert totals['APGD-CE/T via fc'] == (1 + 1) * (3 + 1)
    assert totals['APGD-CE/T via dynamic'] == (1 + 2) * (3 + 1)
    # every batch an APGD run evaluates ticks (the start, each iteration, the restarts): at least the iterations
    assert rec.ticks['APGD-CE/T via fc'] >= 2 * (1 + 3) and rec.ticks['APGD-CE/T via dynamic'] >= 3 * (1 + 3)


def test_the_bar_never_runs_past_its_total():
    bar = StageProgress(enabled=True, position=0)
    bar.stage('x', total=3)
    for _ in range(5):
        bar.tick()
    assert bar._bar.n == 3
    bar.close()
    StageProgress(enabled=False).tick()  # disabled: nothing to update, no error


def _result(**msa):
    return {'name': 'm', 'protocol': 'msa', 'threat_model': 'Linf', 'eps': 0.1, 'n_examples': 8, 'batch_size': 8,
            'hpm_mode': 'dynamic', 'settings': {'protocol': 'msa', 'msa': msa},
            'batchings': {'default': {'clean_acc': 1.0, 'autoattack_acc': 0.5, 'realised_acc': 0.5,
                                      'union_acc': 0.5}},
            'per_surrogate_acc': {'fc': 0.5}, 'worst_batching': 'default', 'msa_acc': 0.5, 'msa_union_acc': 0.5,
            'passes': {'forward_images': 1, 'backward_images': 1}, 'attack_seconds': 1.0}


def test_eval_md_says_when_the_budget_was_reduced():
    full = _result(**MSAConfig(eps=0.1).to_dict())
    assert reduced_budget(full) == [] and 'REDUCED' not in format_table(full)
    quick = _result(**MSAConfig(eps=0.1, apgd_iters=20, autoattack_iters=20, square_queries=300).to_dict())
    text = format_table(quick)
    assert text.splitlines()[2].startswith('REDUCED ATTACK BUDGET: these are not full-strength figures (')
    assert 'apgd_iters 20 (full: 100)' in text and 'Square queries 300 (standard: 5000)' in text
