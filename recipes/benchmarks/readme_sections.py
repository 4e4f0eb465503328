"""Rewrites a generated section of the README (between ``<!-- name:start -->`` and ``<!-- name:end -->``)."""
import re
from pathlib import Path


def update_section(readme: Path, name: str, text: str) -> None:
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    content = readme.read_text()
    if start not in content or end not in content:
        raise SystemExit(f'{readme} has no {start} ... {end} markers')
    readme.write_text(re.sub(re.escape(start) + '.*?' + re.escape(end), lambda _: f'{start}\n{text}\n{end}',
                             content, flags=re.S))
