"""Reports: Markdown tables, the README's generated sections, the paired comparison of two evaluations, the tuning
table.

Library code the recipes share (they import the package, never each other).
"""
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ['markdown_table', 'check_section', 'update_section', 'print_or_update', 'paired', 'paired_difference', 'tuning_table']


def markdown_table(header: Sequence, rows: Iterable[Sequence], align: Optional[str] = None) -> str:
    """A Markdown table (no trailing newline): a line per row, each cell written ``| cell |``; a ``None`` cell is a
    blank written ``| |`` (an empty string gives ``|  |``). ``align``: a letter per column, ``l`` (``---``) or
    ``r`` (``---:``, numbers); all ``l`` by default."""
    align = align or 'l' * len(header)
    if len(align) != len(header) or set(align) - {'l', 'r'}:
        raise ValueError(f"align needs one 'l' or 'r' per column ({len(header)}), got {align!r}")

    def line(cells) -> str:
        if len(cells) != len(header):
            raise ValueError(f'a row of {len(cells)} cells in a table of {len(header)} columns: {cells}')
        return '|' + '|'.join(' ' if c is None else f' {c} ' for c in cells) + '|'
    rule = '|' + '|'.join('---:' if a == 'r' else '---' for a in align) + '|'
    return '\n'.join([line(header), rule] + [line(r) for r in rows])


def check_section(readme: Path, name: str) -> str:
    """``readme``'s text, after checking it has the generated section ``name`` (``<!-- name:start -->`` ...
    ``<!-- name:end -->``); a long job calls it up front, before its :func:`update_section` at the end."""
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    content = Path(readme).read_text() if Path(readme).is_file() else ''
    if start not in content or end not in content:
        raise ValueError(f'{readme} has no {start} ... {end} markers')
    return content


def update_section(readme: Path, name: str, text: str) -> None:
    """Rewrite the generated section ``name`` of ``readme`` (between ``<!-- name:start -->`` and
    ``<!-- name:end -->``) with ``text``."""
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    content = check_section(readme, name)
    readme.write_text(re.sub(re.escape(start) + '.*?' + re.escape(end), lambda _: f'{start}\n{text}\n{end}',
                             content, flags=re.S))


def print_or_update(text: str, readme: Optional[Path], name: str) -> None:
    """Print ``text``, or with ``readme`` (a recipe's ``--update``) rewrite that file's generated section ``name``."""
    if readme is None:
        print(text)
        return
    update_section(readme, name, text)


def paired(a: dict, b: dict) -> dict:
    """Paired comparison of two evaluations of the same images: the images only one of them keeps, and the exact
    two-sided sign-test (McNemar) p-value of the difference."""
    if sorted(a) != sorted(b):
        raise ValueError('the two runs cover different images')
    only_a = sum(a[i] and not b[i] for i in a)
    only_b = sum(b[i] and not a[i] for i in a)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return dict(n=len(a), only_a=only_a, only_b=only_b, difference=(only_b - only_a) / len(a), p=min(1.0, 2 * tail))


def paired_difference(a: Sequence, b: Sequence) -> dict:
    """``b - a`` on the same images (per-image correctness, 0/1 or bools): the difference of the accuracies, its
    standard error from the per-image differences (their sample standard deviation over sqrt(n)) and the normal 95%
    interval. Pairing removes what both get right or both get wrong from the error."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f'paired_difference needs two equally long, non-empty results, got {len(a)} and {len(b)}')
    return mean_difference([int(bool(j)) - int(bool(i)) for i, j in zip(a, b)])


def mean_difference(d: Sequence[float]) -> dict:
    """The mean of per-image differences ``d`` with its standard error (their sample standard deviation over
    sqrt(n)) and the normal 95% interval; the images are the sampling unit (a per-image difference may itself be an
    average, e.g. over seeds on the same images)."""
    n = len(d)
    if not n:
        raise ValueError('mean_difference needs at least one difference')
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    return dict(n=n, difference=mean, se=se, ci95=(mean - 1.959964 * se, mean + 1.959964 * se))


def tuning_table(results: dict) -> str:
    """The Markdown table of a tuning sweep's results (recipes/tune_hpm.py's tuning.json)."""
    def pct(v):
        return f'{100 * v:.1f}%'
    rows = []
    if 'base' in results:
        b = results['base']
        rows.append([f"base `{b['model']}`", 'no HPM', f"{pct(b['fc_clean'])} (fc)", '-', '-', pct(b['fc_val'])])
    for name, r in results['candidates'].items():
        change = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in r['overrides'].items()) or '(defaults)'
        star = ' **best**' if name == results.get('best') else ''
        rows.append([f'{name}{star}', change, pct(r['dynamic_clean']), pct(r['msa_val']), pct(r['static_val']),
                     pct(r['fc_val'])])
    return markdown_table(['candidate', 'change', 'clean (dynamic)', 'MSA-surrogates (dynamic)', 'APGD (static)',
                           'APGD (fc)'], rows, 'llrrrr')
