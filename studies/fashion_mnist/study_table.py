"""The Fashion-MNIST study's tables (studies/fashion_mnist/README.md), from the committed JSON results, never typed.

    python studies/fashion_mnist/study_table.py --n-test 1000 --n-sensitivity 500 --n-batchings 250      # print
    python studies/fashion_mnist/study_table.py --n-test 1000 --n-sensitivity 500 --n-batchings 250 \
        --update studies/fashion_mnist/README.md  # the study's README
    (``--hpm-run eval_hpm_msa4_1000``: the HPM figures from that run folder; ``--candidate-run NAME=FOLDER``: a
    held-out study candidate evaluated at full strength on the same test images, a row and paired comparisons;
    ``--candidate-control NAME=FOLDER``: the AutoAttack run of that candidate's own budget-matched control, when its
    budget is not the main control's, read against it instead; ``--candidate-batchings NAME=FOLDER``: an MSA run of
    that candidate's model on other batchings, for its per-batching line). The section ends with the command that
    generated it (a test regenerates it from there). The test-set runs are read from ``results/fashion_mnist/``
    (``--results``), the tuning sweep from this study's ``results/tuning/``.
"""
import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, NamedTuple, Optional

from timm_hpm.analysis import format_summary
from timm_hpm.cards import paired_comparison
from timm_hpm.eval import robust_flags, stage_label, stage_order
from timm_hpm.eval.run_header import read_run_fingerprint
from timm_hpm.report import markdown_table, print_or_update, tuning_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / 'results' / 'fashion_mnist'
TUNING = Path(__file__).resolve().parent / 'results' / 'tuning' / 'tuning.json'  # recipes/tune_hpm.py's sweep


def _pct(v) -> str:
    return 'unknown' if v is None else f'{100 * v:.1f}%'


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


class CandidateRun(NamedTuple):
    """A held-out study candidate's full-strength test run: its folder under the results, its eval.json and its
    per-image robustness (read once, used by the table row, the paired lines and the per-batching line)."""
    folder: str
    result: dict
    flags: Optional[Dict[int, bool]]


def load_candidate_runs(results: Path, folders: Dict[str, str]) -> Dict[str, CandidateRun]:
    """name -> :class:`CandidateRun` for ``folders`` (name -> run folder under ``results``); a run without its
    eval.json is an unfinished one and an error."""
    runs = {}
    for name, folder in folders.items():
        result = _load(results / folder / 'eval.json')
        if result is None:
            raise FileNotFoundError(f'candidate {name}: no {results / folder / "eval.json"} (finish that run first)')
        runs[name] = CandidateRun(folder, result, robust_flags(results / folder))
    return runs


def _msa_differences(run: dict, headline: dict = None) -> str:
    """How a run's MSA settings differ from the headline run's (empty when they agree or there is no headline)."""
    if headline is None:
        return ''
    from timm_hpm.eval.run_folder import settings_as_run  # what an older run did for the options added since
    a, b = (settings_as_run(r['settings'])['msa'] for r in (run, headline))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ', '.join(f'{k}={json.dumps(a.get(k))} (headline: {json.dumps(b.get(k))})' for k in keys)


def batchings_table(run: dict, rel: Path, name: str, natural: dict = None, natural_name: str = None,
                    headline: dict = None) -> list:
    """MSA per batching of one run: every stage, the realised worst case, the worst batching and the union; with
    ``natural``, the run on the worst natural batching (class-sorted, as a class-folder dataset gives) as a row;
    with ``headline`` (the HPM run of the main table), how this run's MSA settings differ from it."""
    n = run['n_examples']
    stages = stage_order(run['settings'], next(iter(run['batchings'].values()))['per_surrogate_acc'])
    differences = _msa_differences(run, headline)
    out = [f"MSA per batching (the dynamic head's output depends on its batch): the first {n} test images, "
           f"fixed batches of {run['batch_size']}{' (single: 1)' if 'single' in run['batchings'] else ''}, "
           + (f'full strength but with earlier MSA settings than the run above ({differences}; these rows and the '
              'class-sorted one are weaker evaluations than the headline)' if differences
              else 'full strength as above')
           + f". Results: `{rel}/{name}/eval.json`, `{run['command']}`."
           + (f" With {n} images in batches of {run['batch_size']} the shuffled batch has the same members as the "
              'default one (a single batch), so the shuffled row is a second MSA run with other random starts, not '
              'another batch composition.' if n <= run['batch_size'] and 'shuffled' in run['batchings'] else ''), '']
    rows = [[batching, _pct(b['clean_acc']), *(_pct(b['per_surrogate_acc'][s]) for s in stages),
             _pct(b['realised_acc'])] for batching, b in run['batchings'].items()]
    if natural is not None:
        b = natural['batchings']['class_sorted']
        rows.append([f"class_sorted, batches of {natural['batch_size']} (a class-folder dataset's order; "
                     f"`{rel}/{natural_name}`)", _pct(b['clean_acc']),
                     *(_pct(b['per_surrogate_acc'].get(s)) for s in stages), _pct(b['realised_acc'])])
    rows.append([f"**worst batching ({run['worst_batching']})**", _pct(run['clean_acc']), *('' for _ in stages),
                 f"**{_pct(run['msa_acc'])}**"])
    rows.append(['per-sample union over the batchings', None, *('' for _ in stages), _pct(run['msa_union_acc'])])
    out.append(markdown_table(['batching', 'clean', *(f'stage: {stage_label(s, "via")}' for s in stages),
                               'worst case'], rows, 'lr' + 'r' * len(stages) + 'r'))
    return out


def _main_rows(base: dict, static: dict, hpm: dict, control: dict = None, candidates: dict = None,
               controls: dict = None) -> list:
    """The main table's rows: the base, the control and the static l2 head under AutoAttack, HPM under MSA stage by
    stage, each held-out study candidate (``candidates``: name -> :class:`CandidateRun`) under MSA and the
    candidates' own controls (``controls``: name -> :class:`CandidateRun`) under AutoAttack."""
    rows = []
    if base:
        rows.append(['base `small_cnn.fmnist_pgdat`', 'fc', 'AutoAttack (standard)', _pct(base['clean_acc']),
                     _pct(base['autoattack_acc']), f"`{base['command']}`"])
    if control:
        rows.append(['control `small_cnn.fmnist_control` (the base + PGD-AT with the HPM budget)', 'fc',
                     'AutoAttack (standard)', _pct(control['clean_acc']), _pct(control['autoattack_acc']),
                     f"`{control['command']}`"])
    if static:
        rows.append(['HPM `hpm_small_cnn.fmnist_hpm`', 'static l2', 'AutoAttack (standard)', _pct(static['clean_acc']),
                     _pct(static['autoattack_acc']), f"`{static['command']}`"])
    if hpm:
        model = 'HPM `hpm_small_cnn.fmnist_hpm`'
        for batching, b in hpm['batchings'].items():
            for name in stage_order(hpm['settings'], b['per_surrogate_acc']):
                rows.append([model, 'dynamic', f'MSA ({batching} batching) stage: {stage_label(name)}',
                             _pct(b['clean_acc']), _pct(b['per_surrogate_acc'][name]), None])
            rows.append([model, 'dynamic', f'**MSA ({batching} batching), worst case**', _pct(b['clean_acc']),
                         f"**{_pct(b['realised_acc'])}**", None])
        rows.append([model, 'dynamic', f"**MSA, worst batching ({hpm['worst_batching']})**", _pct(hpm['clean_acc']),
                     f"**{_pct(hpm['msa_acc'])}**", f"`{hpm['command']}`"])
    for name, run in ((name, c.result) for name, c in (candidates or {}).items()):
        rows.append([f"held-out study candidate `{name}`: `{run['name']}`, fixed batches of {run['batch_size']}",
                     'dynamic', f"**MSA, worst batching ({run['worst_batching']})**", _pct(run['clean_acc']),
                     f"**{_pct(run['msa_acc'])}**", f"`{run['command']}`"])
    for name, run in ((name, c.result) for name, c in (controls or {}).items()):
        rows.append([f"budget-matched control of `{name}`: `{run['name']}` (the base + PGD-AT with `{name}`'s budget)",
                     'fc', 'AutoAttack (standard)', _pct(run['clean_acc']), _pct(run['autoattack_acc']),
                     f"`{run['command']}`"])
    return rows


def _paired_lines(results: Path, rel, n_test: int, base, static, hpm, control, hpm_run: str,
                  candidates: dict = None, controls: dict = None) -> list:
    """Paired comparisons on the same images (per-image results of the realised batches): HPM, the static l2 head
    and each held-out study candidate (``candidates``: name -> :class:`CandidateRun`) against the base
    and against the budget-matched control (a candidate's own one from ``controls`` where it has one), and the base
    against each control, with the exact sign test and the paired 95% interval."""
    flags = {key: robust_flags(results / folder) if run else None
             for key, folder, run in (('base', f'eval_base_{n_test}', base), ('hpm', hpm_run, hpm),
                                      ('static', f'eval_static_{n_test}', static),
                                      ('control', f'eval_control_{n_test}', control))}
    names = {'base': 'the base under AutoAttack', 'hpm': 'HPM under MSA',
             'static': 'the static l2 head under AutoAttack', 'control': 'the control under AutoAttack'}
    short = {'base': 'the base', 'hpm': 'HPM', 'static': 'the static l2 head', 'control': 'the control'}
    pairs = [('base', 'hpm'), ('base', 'static'), ('control', 'hpm'), ('control', 'static')]
    own_controls = []
    for name, run in (candidates or {}).items():
        flags[name] = run.flags
        names[name], short[name] = f'`{name}` under MSA', f'`{name}`'
        against = 'control'
        if name in (controls or {}):
            against = f'control of {name}'
            flags[against] = controls[name].flags
            names[against] = f"`{name}`'s control under AutoAttack"
            short[against] = f"`{name}`'s control"
            own_controls.append((against, 'base'))
        pairs += [('base', name), (against, name)]
    lines = []
    for a, b in pairs + [('control', 'base')] + own_controls:
        if not (flags[a] and flags[b]):
            continue
        c = paired_comparison(flags[b], flags[a], names[a])
        lines.append(f"{names[b]} vs {names[a]}: {c['only_other']} images only {short[a]} keeps, {c['only_model']} "
                     f"only {short[b]} keeps, difference {c['difference']} points (95% CI {c['ci_low']} to "
                     f"{c['ci_high']}), exact sign-test p = {c['p']}")
    if not lines:
        return []
    return ['', f'Paired on the same {n_test} images (per-image results in `{rel}/eval_*_{n_test}/attack/units.jsonl`): '
            + '; '.join(lines) + '.']


def _model_fingerprint(results: Path, folder: str) -> Optional[str]:
    """The evaluated model's fingerprint (weights and head options) of a run folder under ``results``."""
    fp = read_run_fingerprint(results / folder / 'attack')  # its units file's header (or an older fingerprint.json)
    return fp and fp.get('model')


def _batchings_of(results: Path, folder: str, candidate: CandidateRun) -> list:
    """``(label, run folder, batching)`` for every batching of an MSA run folder under ``results`` of the same model
    as ``candidate`` (another model, or MSA settings other than the candidate's, are refused: errors)."""
    run = _load(results / folder / 'eval.json')
    if run is None:
        raise FileNotFoundError(f'no {results / folder / "eval.json"} (finish that run first)')
    fingerprints = _model_fingerprint(results, folder), _model_fingerprint(results, candidate.folder)
    if None in fingerprints:
        raise ValueError(f'{folder} or {candidate.folder} has no model fingerprint in its attack run: which model '
                         'each evaluated cannot be told')
    if fingerprints[0] != fingerprints[1]:
        raise ValueError(f'{folder} evaluated another model than {candidate.folder} (other weights or head options)')
    differences = _msa_differences(run, candidate.result)
    if differences:
        raise ValueError(f'{folder} ran MSA with other settings than {candidate.folder}: {differences}')
    labels = {'single': 'single, batches of 1', 'class_sorted': f"class-sorted, batches of {run['batch_size']}"}
    return [(f"{labels.get(b, f'{b}, batches of ' + str(run['batch_size']))} (`{folder}`)", results / folder, b)
            for b in run['batchings']]


def _candidate_batchings(results: Path, candidates: dict, hpm: dict, hpm_run: str, n: int,
                         candidate_batchings: dict = None) -> list:
    """For each held-out study candidate with other batchings of its model measured on the first ``n`` test images:
    its realised figure there next to each of them, the worst of them and the per-image union. A candidate that
    evaluates the HPM model of the main table at another batch size gets that model's runs (the main run, the
    per-batching run, the class-sorted run); ``candidate_batchings`` (name -> run folders under ``results``) adds
    runs of a candidate's own model."""
    shipped = [(f'fixed batches of {hpm["batch_size"]} (`{hpm_run}`)', results / hpm_run, 'default')] if hpm else []
    for batching in ('default', 'shuffled', 'single'):
        shipped.append((f'{batching} (`eval_hpm_batchings_{n}`)', results / f'eval_hpm_batchings_{n}', batching))
    shipped.append((f'class-sorted, batches of 32 (`eval_hpm_class_sorted_b32_{n}`)',
                    results / f'eval_hpm_class_sorted_b32_{n}', 'class_sorted'))
    lines = []
    for name, candidate in candidates.items():
        _, run, flags = candidate
        same_as_shipped = hpm is not None and run['name'] == hpm['name']
        sources = (shipped if same_as_shipped else []) + [
            s for folder in (candidate_batchings or {}).get(name, ()) for s in _batchings_of(results, folder, candidate)]
        if not sources:
            continue
        found = [(f"fixed batches of {run['batch_size']} (this candidate)", flags)]
        found += [(label, robust_flags(folder, batching)) for label, folder, batching in sources]
        found = [(label, {i: v for i, v in flags.items() if i < n}) for label, flags in found if flags]
        found = [(label, flags) for label, flags in found if len(flags) == n]
        if len(found) < 2:
            continue
        accs = [(label, sum(flags.values()) / n) for label, flags in found]
        union = sum(all(flags[i] for _, flags in found) for i in range(n)) / n
        worst = min(accs, key=lambda a: a[1])
        lines.append(f"Candidate `{name}` per batching on the first {n} test images (the same model; realised batches "
                     'of each run' + (', some with earlier MSA settings, see the per-batching table'
                                      if same_as_shipped else '') + '): '
                     + '; '.join(f'{label} {_pct(acc)}' for label, acc in accs)
                     + f'. Worst batching: {worst[0]}, {_pct(worst[1])}; per-image union over these batchings '
                     f'{_pct(union)}.')
    return [''] + lines if lines else []


def command_line(n_test: int, n_sensitivity: int = None, n_batchings: int = None, hpm_run: str = None,
                 candidate_runs: dict = None, candidate_controls: dict = None, candidate_batchings: dict = None,
                 results: Path = None) -> str:
    """The ``studies/fashion_mnist/study_table.py`` command that makes :func:`study_tables` with these arguments."""
    args = ['--n-test', n_test]
    for option, value in (('--results', results), ('--n-sensitivity', n_sensitivity),
                          ('--n-batchings', n_batchings), ('--hpm-run', hpm_run)):
        args += [option, value] if value is not None else []
    for option, pairs in (('--candidate-run', candidate_runs), ('--candidate-control', candidate_controls)):
        args += [a for name, folder in (pairs or {}).items() for a in (option, f'{name}={folder}')]
    args += [a for name, folders in (candidate_batchings or {}).items() for folder in folders
             for a in ('--candidate-batchings', f'{name}={folder}')]
    return shlex.join(['python', 'studies/fashion_mnist/study_table.py', *map(str, args)])


def study_tables(results: Path, n_test: int, n_sensitivity: int = None, n_batchings: int = None,
                 hpm_run: str = None, candidate_runs: dict = None, candidate_controls: dict = None,
                 candidate_batchings: dict = None) -> str:
    """The tables; ``hpm_run``: the HPM model's MSA run folder under ``results`` (default ``eval_hpm_<n_test>``);
    ``candidate_runs``: the held-out study's best candidates at full strength on the same images, name -> run folder
    under ``results``; ``candidate_controls``: name -> the AutoAttack run folder of a candidate's own budget-matched
    control (a candidate without one is read against ``eval_control_<n_test>``); ``candidate_batchings``: name ->
    MSA run folders of a candidate's model on other batchings of the first ``n_batchings`` images. The last line
    names the :func:`command_line` of these arguments."""
    rel = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    command = command_line(n_test, n_sensitivity, n_batchings, hpm_run, candidate_runs, candidate_controls,
                           candidate_batchings, None if results == RESULTS else rel)
    hpm_run = hpm_run or f'eval_hpm_{n_test}'
    candidates = load_candidate_runs(results, dict(candidate_runs or {}))
    unknown = sorted((set(candidate_controls or {}) | set(candidate_batchings or {})) - set(candidates))
    if unknown:
        raise ValueError(f'controls or batchings for {unknown}, which are not candidates: pass --candidate-run '
                         'NAME=FOLDER too')
    controls = load_candidate_runs(results, dict(candidate_controls or {}))
    base = _load(results / f'eval_base_{n_test}' / 'eval.json')
    static = _load(results / f'eval_static_{n_test}' / 'eval.json')
    hpm = _load(results / hpm_run / 'eval.json')
    control = _load(results / f'eval_control_{n_test}' / 'eval.json')
    tuning = _load(TUNING if results == RESULTS else results / 'tuning' / 'tuning.json')
    sens = _load(results / f'sensitivity_{n_sensitivity or n_test}' / 'sensitivity.json')
    batchings = _load(results / f'eval_hpm_batchings_{n_batchings}' / 'eval.json') if n_batchings else None
    out = []
    if base or static or hpm:
        out += [f'Test set: the first {n_test} of the 10,000 Fashion-MNIST test images, Linf eps 0.1, fixed batches of '
                f"{(hpm or base or static)['batch_size']}. Results: `{rel}/eval_*_{n_test}/eval.json`"
                + (f" (HPM: `{rel}/{hpm_run}/eval.json`)" if hpm_run != f'eval_hpm_{n_test}' else '')
                + ''.join(f"; held-out study candidate `{name}`: `{rel}/{run.folder}/eval.json`"
                          + (f" (its budget-matched control: `{rel}/{controls[name].folder}/eval.json`)"
                             if name in controls else '') for name, run in candidates.items())
                + '. An MSA stage row is the best candidate batch that stage produced from the realised batch so '
                'far; the worst case is the realised batch after all stages.', '']
        out.append(markdown_table(['model', 'head', 'attack', 'clean', 'robust', 'command'],
                                  _main_rows(base, static, hpm, control, candidates, controls), 'lllrrl'))
    out += _paired_lines(results, rel, n_test, base, static, hpm, control, hpm_run, candidates, controls)
    if n_batchings:
        out += _candidate_batchings(results, candidates, hpm, hpm_run, n_batchings, candidate_batchings)
    if batchings:
        natural_name = f'eval_hpm_class_sorted_b32_{n_batchings}'
        natural = _load(results / natural_name / 'eval.json') if (results / natural_name / 'eval.json').is_file() \
            else None
        out += [''] + batchings_table(batchings, rel, f'eval_hpm_batchings_{n_batchings}', natural, natural_name,
                                      hpm)
        if natural is not None:
            out += ['', f"The worst natural batching (class-sorted, batches of {natural['batch_size']}: what timm's "
                    f"`validate.py` on class folders gives) is not in the worst case above, which covers the three "
                    f"batchings of that run: MSA there gives {_pct(natural['msa_acc'])} robust at "
                    f"{_pct(natural['clean_acc'])} clean (`{natural['command']}`)."]
    if tuning:
        sc = tuning['scoring']
        out += ['', f"Tuning on held-out training images (the first {sc['n_val']} of the 5,000 the fine-tuning never "
                f"sees; never the test set), one option at a time around `{tuning['config']}` with "
                f"{', '.join(f'{k}={v}' for k, v in tuning['common'].items())}: "
                f"`{tuning['command']}`. MSA-surrogates = the surrogate part of MSA ({sc['apgd_iters']} APGD "
                f"iterations, {sc['n_target_classes']} targets, fixed batches of {sc['batch_size']}) without AutoAttack "
                'on the target: an upper bound on MSA, used for ranking. APGD = APGD-CE then APGD-DLR.', '']
        out.append(tuning_table(tuning))
    if sens:
        out += ['', f"Sensitivity of `{sens['model']}` (FC head vs static l2 head, same weights; first "
                f"{sens['n_examples']} test images; {sens['robust_accuracy']['attack']}): `{sens['command']}`", '',
                format_summary(sens)]
    out += ['', f'Generated from the committed results by `{command}` (`--update studies/fashion_mnist/README.md` '
                'rewrites this section).']
    return '\n'.join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--results', type=Path, default=RESULTS)
    parser.add_argument('--n-test', type=int, required=True)
    parser.add_argument('--n-sensitivity', type=int, help='test images of the sensitivity run (default: --n-test)')
    parser.add_argument('--n-batchings', type=int,
                        help='test images of the per-batching MSA run (eval_hpm_batchings_N)')
    parser.add_argument('--hpm-run', help="the HPM model's MSA run folder under --results (default eval_hpm_<n-test>)")
    parser.add_argument('--candidate-run', action='append', default=[], metavar='NAME=FOLDER',
                        help="a held-out study candidate's full-strength MSA run folder under --results (repeatable)")
    parser.add_argument('--candidate-control', action='append', default=[], metavar='NAME=FOLDER',
                        help="the AutoAttack run folder of a --candidate-run's own budget-matched control (when its "
                             "budget is not the main control's; repeatable)")
    parser.add_argument('--candidate-batchings', action='append', default=[], metavar='NAME=FOLDER',
                        help="an MSA run folder of a --candidate-run's model on other batchings of the first "
                             "--n-batchings images (repeatable, also for one candidate)")
    parser.add_argument('--update', type=Path, help='rewrite the section between the markers in this file')
    return parser


def tables_from_args(argv=None) -> tuple:
    """``(tables, --update)`` for a command line of this recipe (the README section's last line names one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    pairs = {}
    for option in ('candidate_run', 'candidate_control', 'candidate_batchings'):
        pairs[option] = {}
        for item in getattr(args, option):
            name, sep, folder = item.partition('=')
            if not (sep and name and folder):
                parser.error(f"--{option.replace('_', '-')} {item!r}: expected NAME=FOLDER")
            if option == 'candidate_batchings':
                pairs[option].setdefault(name, []).append(folder)
            else:
                pairs[option][name] = folder
    return study_tables(args.results.resolve(), args.n_test, args.n_sensitivity, args.n_batchings, args.hpm_run,
                        pairs['candidate_run'], pairs['candidate_control'], pairs['candidate_batchings']), args.update


def main():
    tables, update = tables_from_args()
    print_or_update(tables, update, 'fmnist-study')


if __name__ == '__main__':
    main()
