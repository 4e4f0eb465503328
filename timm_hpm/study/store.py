"""A study's scores in one file: ``<out>/scores.jsonl``, one line per scored model (``{"name": ..., "score": ...}``;
the base's name is ``base``, a candidate's ``<candidate>/seed<k>``).

A score is appended whole and fsynced before the study goes on (:func:`timm_hpm.runfiles.append_jsonl`, as an
evaluation's units), so a killed study resumes with every score it finished. A killed write can leave a partial last
line: it is ignored with a warning (that model is scored again) and cut off before the next append. Any other
unreadable line, or a name on two lines, is an error (the file was edited or two studies wrote it), never guessed
at.

Earlier versions wrote one file per model (``<out>/scores/<candidate>__seed<k>.json``, ``scores/base.json``):
:meth:`ScoreStore.convert_old_layout` brings such a folder into the file (the study command does it when it finds
one) and removes the files it brought over; a score found in both must be the same score.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from ..runfiles import append_jsonl, read_jsonl

__all__ = ['ScoreStore', 'SCORES_FILE', 'OLD_SCORES_DIR', 'read_scores']

SCORES_FILE = 'scores.jsonl'
OLD_SCORES_DIR = 'scores'  # the per-model layout of earlier versions


def read_scores(path: Path) -> Dict[str, dict]:
    """name -> score of a scores file (empty when there is none). A line that is no score entry, or a name on two
    lines, raises ValueError naming the file and lines; a partial last line (a killed write) is left out with a
    warning (:func:`timm_hpm.runfiles.read_jsonl`)."""
    path = Path(path)
    if not path.exists():
        return {}
    scores: Dict[str, dict] = {}
    where_of: Dict[str, str] = {}
    for where, entry in read_jsonl(path):
        name, score = entry.get('name'), entry.get('score')
        if not isinstance(name, str) or not isinstance(score, dict):
            raise ValueError(f'{where} is not a score entry ({{"name": ..., "score": {{...}}}}): the file is damaged; '
                             'fix or remove that line')
        if name in scores:
            raise ValueError(f'{name} is scored twice ({where_of[name]} and {where}): remove one')
        scores[name], where_of[name] = score, where
    return scores


class ScoreStore:
    """The scores of one study's ``out`` folder (:data:`SCORES_FILE`), read once, appended one score at a time."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / SCORES_FILE
        self.scores = read_scores(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self.scores

    def get(self, name: str):
        return self.scores.get(name)

    def add(self, name: str, score: dict) -> None:
        """Append ``score`` as ``name``'s (an error if ``name`` has one) and make it durable before returning."""
        if name in self.scores:
            raise ValueError(f'{self.path}: {name} is already scored')
        self.out.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, {'name': name, 'score': score})
        self.scores[name] = score

    def convert_old_layout(self) -> int:
        """Bring ``<out>/scores/*.json`` (one file per model, earlier versions) into the file, then remove those files
        (and the folder when nothing else is in it); the number of scores added. A model scored in both must have
        the same score in both (ValueError otherwise, and nothing is removed)."""
        folder = self.out / OLD_SCORES_DIR
        if not folder.is_dir():
            return 0
        found = {}
        for path in sorted(folder.glob('*.json')):
            record = json.loads(path.read_text())
            name = 'base' if path.stem == 'base' else '/'.join(path.stem.rsplit('__', 1))
            if record.get('candidate', name) != name:
                raise ValueError(f"{path} holds the score of {record['candidate']}, not of {name}")
            if name in self.scores and self.scores[name] != record:
                raise ValueError(f'{path} and {self.path} hold different scores of {name}: keep one (remove the '
                                 'file, or its line) and run again')
            found[name] = (path, record)
        added = 0
        for name, (_, record) in found.items():
            if name not in self.scores:
                self.add(name, record)
                added += 1
        for path, _ in found.values():
            path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
        return added
