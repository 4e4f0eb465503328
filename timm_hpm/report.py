"""Reports: the README's generated sections, the paired comparison of two evaluations, the tuning table.

Library code the recipes share (they import the package, never each other).
"""
import math
import re
from pathlib import Path

__all__ = ['update_section', 'paired', 'tuning_table']


def update_section(readme: Path, name: str, text: str) -> None:
    """Rewrite the generated section ``name`` of ``readme`` (between ``<!-- name:start -->`` and
    ``<!-- name:end -->``) with ``text``."""
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    content = readme.read_text()
    if start not in content or end not in content:
        raise ValueError(f'{readme} has no {start} ... {end} markers')
    readme.write_text(re.sub(re.escape(start) + '.*?' + re.escape(end), lambda _: f'{start}\n{text}\n{end}',
                             content, flags=re.S))


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


def tuning_table(results: dict) -> str:
    """The Markdown table of a tuning sweep's results (recipes/tune_hpm.py's tuning.json)."""
    def pct(v):
        return f'{100 * v:.1f}%'
    lines = ['| candidate | change | clean (dynamic) | MSA-surrogates (dynamic) | APGD (static) | APGD (fc) |',
             '|---|---|---:|---:|---:|---:|']
    if 'base' in results:
        b = results['base']
        lines.append(f"| base `{b['model']}` | no HPM | {pct(b['fc_clean'])} (fc) | - | - | {pct(b['fc_val'])} |")
    for name, r in results['candidates'].items():
        change = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in r['overrides'].items()) or '(defaults)'
        star = ' **best**' if name == results.get('best') else ''
        lines.append(f"| {name}{star} | {change} | {pct(r['dynamic_clean'])} | {pct(r['msa_val'])} | "
                     f"{pct(r['static_val'])} | {pct(r['fc_val'])} |")
    return '\n'.join(lines)
