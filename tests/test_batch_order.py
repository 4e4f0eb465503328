"""Batch composition as an evaluation axis (issue #18): the class_sorted batching is the order a class-folder dataset
yields, for clean accuracy and for MSA's realised batch; a batch-independent model gives one figure in every
batching; the batch-order table recipe measures what a batch-dependent model gives in each order and batch size."""
import json

import pytest
import timm
import torch
import torch.nn as nn
from _recipes import load_recipe
from conftest import needs_fashion_mnist

import timm_hpm
from timm_hpm.eval import MSAConfig, evaluate
from timm_hpm.eval.batching import BATCHINGS, make_batchings

FAST = dict(apgd_iters=5, autoattack_iters=5, square_queries=20, n_target_classes=1)
K = 4


@pytest.fixture(scope='module')
def table_recipe():
    return load_recipe('batch_order_table')


def folder_order(y):
    """The order a class-folder dataset yields the images in when each file is named by its index: by class,
    then by file name (Python's sort is stable: the truth, computed apart from the code under test)."""
    return sorted(range(len(y)), key=lambda i: (int(y[i]), i))


def consecutive_batches(order, size):
    """How timm's validate.py batches a loader: consecutive slices, the last one smaller, nothing dropped."""
    return [order[i:i + size] for i in range(0, len(order), size)]


def dynamic_hpm(n=40, seed=2):
    """A small HPM model in its batch-dependent (dynamic) mode, and images it classifies (at this seed its
    predictions move with the batch's other images; at some seeds the toy's do not)."""
    torch.manual_seed(seed)
    model = timm_hpm.convert_to_hpm(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, K))).eval()
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        y = model.hpm_head.fc_forward(feats).argmax(1)
        model.hpm_head.init_prototypes_([(feats, y)])
    y = torch.where(torch.rand(n) < 0.3, torch.randint(0, K, (n,)), y)  # some errors, so accuracy can move
    return model.eval(), x, y


def test_class_sorted_is_the_folder_order_cut_as_validate_does():
    y = torch.randint(0, 5, (103,), generator=torch.Generator().manual_seed(0))
    plan = make_batchings(103, 10, ['class_sorted', 'default'], seed=0, labels=y)
    assert plan['class_sorted'] == consecutive_batches(folder_order(y), 10)
    assert [len(b) for b in plan['class_sorted']] == [10] * 10 + [3]
    assert plan['default'] == consecutive_batches(list(range(103)), 10)
    assert BATCHINGS.index('class_sorted') == 3  # appended: the other batchings' attack seeds are unchanged
    with pytest.raises(ValueError, match="'class_sorted' batching needs the 103 labels"):
        make_batchings(103, 10, ['class_sorted'], seed=0)


def test_a_batch_independent_model_gives_one_figure_in_every_batching(tmp_path, table_recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, K)).eval()
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, K, (20,))
    table = table_recipe.order_table(model, x, y, [1, 3, 8])
    assert len({v for by_size in table.values() for v in by_size.values()}) == 1
    result = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), tmp_path, protocol='autoattack', batch_size=8,
                      batchings=BATCHINGS, progress=False)
    assert {b['clean_acc'] for b in result['batchings'].values()} == {table['default']['1']}


def test_the_table_of_a_batch_dependent_model_is_what_its_batches_give(table_recipe):
    model, x, y = dynamic_hpm()
    table = table_recipe.order_table(model, x, y, [1, 4, 8, 16])
    for order_name, order in (('default', list(range(len(y)))), ('class_sorted', folder_order(y))):
        for size in (1, 4, 8, 16):
            with torch.no_grad():
                correct = sum(int((model(x[b]).argmax(1) == y[b]).sum()) for b in consecutive_batches(order, size))
            assert table[order_name][str(size)] == correct / len(y)
    assert table['class_sorted']['1'] == table['default']['1']  # one image per batch: the order cannot matter
    assert table['class_sorted'] != table['default']  # batches of several: it moves this model's figure


def test_msa_attacks_and_scores_the_class_sorted_batches(tmp_path):
    model, x, y = dynamic_hpm(n=24)
    result = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), tmp_path, protocol='msa', batch_size=8,
                      batchings=('class_sorted',), progress=False)
    batches = consecutive_batches(folder_order(y), 8)
    from timm_hpm.eval.unit_store import read_units
    units = [u for (b, _), u in sorted(read_units(tmp_path).items()) if b == 'class_sorted']
    assert [u['indices'] for u in units] == batches
    with torch.no_grad():
        clean = sum(int((model(x[b]).argmax(1) == y[b]).sum()) for b in batches) / len(y)
    assert result['batchings']['class_sorted']['clean_acc'] == clean
    assert result['msa_acc'] <= clean


def test_table_recipe_writes_once(tmp_path, table_recipe):
    from timm_hpm.hub import save_for_hub
    torch.manual_seed(0)
    model = timm.create_model('hpm_preact_resnet18', in_chans=1, img_size=8, num_classes=4).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    save_for_hub(model, tmp_path / 'model')
    out = tmp_path / 'table'
    argv = ['--model', f'local-dir:{tmp_path / "model"}', '--dataset', 'synthetic', '--n-test', '12',
            '--batch-sizes', '1', '5', '--out', str(out)]
    record = table_recipe.main(argv)
    assert json.loads((out / 'table.json').read_text()) == record
    entry = record['models'][f'local-dir:{tmp_path / "model"}']
    assert set(entry['accuracy']) == {'default', 'class_sorted'} and set(entry['accuracy']['default']) == {'1', '5'}
    assert entry['hpm_mode'] == 'dynamic'
    assert '| class_sorted |' in (out / 'table.md').read_text()
    before = (out / 'table.json').read_bytes()
    with pytest.raises(SystemExit, match='never overwritten'):
        table_recipe.main(argv)
    assert (out / 'table.json').read_bytes() == before


@needs_fashion_mnist
def test_shipped_models_by_order_and_batch_size(table_recipe):
    """The issue's finding, on the shipped weights: the base gives one figure in every order and batch size; the
    batch-dependent HPM model loses accuracy on class-sorted batches of 250 (what validate.py on a folder gives)."""
    from timm_hpm.attacks import normalized_view
    from timm_hpm.data import load_eval_tensors
    tables = {}
    for name in ('small_cnn.fmnist_pgdat', 'hpm_small_cnn.fmnist_hpm'):
        model = normalized_view(timm.create_model(name, pretrained=True)).eval()
        x, y = load_eval_tensors('fashion_mnist', 1000, image_size=(1, 28, 28))
        tables[name] = table_recipe.order_table(model, x, y, [1, 32, 250])
    assert len({v for by_size in tables['small_cnn.fmnist_pgdat'].values() for v in by_size.values()}) == 1
    hpm = tables['hpm_small_cnn.fmnist_hpm']
    assert hpm['default']['1'] == hpm['class_sorted']['1']  # one image per batch: the order cannot matter
    assert hpm['class_sorted']['250'] < hpm['default']['250']


@needs_fashion_mnist
def test_the_folder_recipe_gives_timms_folder_dataset_the_class_sorted_order_and_exact_pixels(tmp_path):
    """recipes/fashion_mnist_folder.py writes what timm's validate.py reads: timm's folder dataset yields the images
    in the class_sorted order, and timm's eval transform gives back the original pixels."""
    from timm.data import create_dataset, create_transform, resolve_data_config
    from timm_hpm.data import load_fashion_mnist
    folder = load_recipe('fashion_mnist_folder').write_folder('test', 40, tmp_path / 'f')
    images, labels = load_fashion_mnist('test').tensors
    model = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True)
    # as validate.py creates it for a 1-channel model
    dataset = create_dataset('', root=str(folder), input_img_mode='L',
                             transform=create_transform(**resolve_data_config({}, model=model)))
    order = make_batchings(40, 40, ['class_sorted'], seed=0, labels=labels[:40])['class_sorted'][0]
    for position, index in enumerate(order):
        x, y = dataset[position]
        assert y == int(labels[index]) and torch.equal(x, images[index])
    with pytest.raises(FileExistsError, match='not empty'):
        load_recipe('fashion_mnist_folder').write_folder('test', 5, folder)
