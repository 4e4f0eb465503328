"""The realised batch of MSA: one concrete adversarial batch, built from candidate batches, always scored whole."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from ..attacks import accuracy
from .stages import COMBINED, ITERATES, candidate_name

__all__ = ['RealisedBatch', 'IterateScores']


class RealisedBatch:
    """The running realised batch of one fixed batch and every candidate's per-sample result.

    A candidate replaces the images of the samples ``replace`` selects; it is scored whole and taken when it lowers
    the batch's accuracy. The images of the samples each candidate breaks are kept, so that :meth:`combine` can
    build one batch from every stage's breaks (a batch-dependent target need not keep a break made in another
    stage's batch: each combination is scored whole too).
    """

    def __init__(self, target: Callable, x: torch.Tensor, y: torch.Tensor):
        self.target, self.x, self.y = target, x, y
        self.clean = accuracy(target, x, y)
        self.x_adv, self.correct, self.union = x.clone(), self.clean.clone(), self.clean.clone()
        self.candidates: Dict[str, torch.Tensor] = {}
        self.breaks: List[tuple] = []  # (indices, images) a candidate broke, in the order they ran
        self.stages: List[str] = []

    def state(self) -> Tuple[Dict[str, torch.Tensor], dict]:
        """Everything but the target and the clean images, as tensors and JSON (names, orders): what
        :meth:`restore` needs to go on with the same batch."""
        tensors = {'clean': self.clean, 'x_adv': self.x_adv, 'correct': self.correct, 'union': self.union}
        tensors.update({f'candidate{i}': c for i, c in enumerate(self.candidates.values())})
        for i, (indices, images) in enumerate(self.breaks):
            tensors[f'break{i}.indices'], tensors[f'break{i}.images'] = indices, images
        return ({k: v.detach().cpu().clone() for k, v in tensors.items()},  # own memory: the realised batch's
                # correctness is often a candidate's tensor, which safetensors refuses to save twice
                {'candidates': list(self.candidates), 'n_breaks': len(self.breaks), 'stages': list(self.stages)})

    @classmethod
    def restore(cls, target: Callable, x: torch.Tensor, y: torch.Tensor, tensors: Dict[str, torch.Tensor],
                meta: dict) -> 'RealisedBatch':
        """The batch :meth:`state` saved, on ``x``, ``y`` (no pass through the target)."""
        batch = cls.__new__(cls)
        batch.target, batch.x, batch.y = target, x, y
        device = x.device
        batch.clean, batch.x_adv, batch.correct, batch.union = (tensors[k].to(device)
                                                                for k in ('clean', 'x_adv', 'correct', 'union'))
        batch.candidates = {name: tensors[f'candidate{i}'].to(device) for i, name in enumerate(meta['candidates'])}
        batch.breaks = [(tensors[f'break{i}.indices'].to(device), tensors[f'break{i}.images'].to(device))
                        for i in range(meta['n_breaks'])]
        batch.stages = list(meta['stages'])
        return batch

    def consider(self, name: str, x_adv: torch.Tensor, replace: torch.Tensor) -> None:
        x_cand = self.x_adv.clone()
        x_cand[replace] = x_adv[replace]
        self._score(name, x_cand)

    def consider_iterates(self, name: str, iterates: 'IterateScores', replace: torch.Tensor) -> None:
        """The whole batches an attack evaluated (:class:`IterateScores`): the one that broke the most is a
        candidate as it was evaluated (``<name>:best-iterate``) and spliced into the realised batch for the samples
        ``replace`` selects (``<name>:best-iterate-spliced``, keeping the earlier breaks), each scored whole; every
        sample some batch broke counts in the union and in :meth:`combine` (``<name>:iterates``: per sample, correct
        in every batch the attack evaluated; not one batch)."""
        if iterates.best_x is None:
            return
        self._score(f'{name}:best-iterate', iterates.best_x)
        self.consider(f'{name}:best-iterate-spliced', iterates.best_x, replace)
        correct = self.clean & ~iterates.broken
        self.candidates[name + ITERATES] = correct
        self.union &= correct
        broken = iterates.broken.nonzero().flatten()
        self.breaks.append((broken, iterates.images[broken]))
        self.stages.append(name + ITERATES)

    def _score(self, name: str, x_cand: torch.Tensor) -> None:
        correct = accuracy(self.target, x_cand, self.y) & self.clean
        self.candidates[name] = correct
        self.union &= correct
        broken = (~correct & self.clean).nonzero().flatten()
        self.breaks.append((broken, x_cand[broken]))
        if int(correct.sum()) < int(self.correct.sum()):
            self.x_adv, self.correct = x_cand, correct
        self.stages.append(name)

    def break_images(self) -> Dict[int, List[torch.Tensor]]:
        """Sample index -> the images of it that broke it, one per candidate that did, in the order they ran."""
        options: Dict[int, List[torch.Tensor]] = {}
        for indices, images in self.breaks:
            for i, image in zip(indices.tolist(), images):
                options.setdefault(i, []).append(image)
        return options

    def combine(self, rounds: int) -> None:
        """Up to ``rounds`` whole-batch candidates made of every stage's breaks: for each sample the realised batch
        still classifies correctly but some candidate broke, round ``r`` puts in the image of the ``r``-th candidate
        that broke it. Each is scored whole and taken when it lowers the accuracy. Forward passes only."""
        options = self.break_images()
        for r in range(rounds):
            pending = [i for i in (self.correct & ~self.union).nonzero().flatten().tolist() if len(options[i]) > r]
            if not pending:
                return
            x_cand = self.x_adv.clone()
            for i in pending:
                x_cand[i] = options[i][r]
            self._score(candidate_name(COMBINED, f'round{r + 1}'), x_cand)

    def search(self, sweeps: int) -> None:
        """Up to ``sweeps`` sweeps of a local search over every stage's breaks, after :meth:`combine`. In a sweep,
        each sample the running batch classifies correctly but some candidate broke gets, one at a time, each
        distinct image that broke it, the rest of the batch as it stands; the change is kept when the batch's
        accuracy drops. One image moves the batch prototypes every sample is classified by, so a break the
        realised batch lost when a later candidate was taken (or that a combination round put in beside others
        and lost) can come back alone. A sweep that keeps nothing ends the search; the batch it ends at is a
        candidate (``combined/search``), scored whole. Forward passes only: at most one per distinct image per
        sample and sweep."""
        if sweeps < 1:
            return
        options = {i: _distinct(images) for i, images in self.break_images().items()}
        x, correct = self.x_adv, self.correct
        for _ in range(sweeps):
            kept = False
            for i in sorted(options):
                for image in options[i] if correct[i] else ():
                    x_cand = x.clone()
                    x_cand[i] = image
                    cand = accuracy(self.target, x_cand, self.y) & self.clean
                    if int(cand.sum()) < int(correct.sum()):
                        x, correct, kept = x_cand, cand, True
                        break
            if not kept:
                break
        if x is not self.x_adv:
            self._score(candidate_name(COMBINED, 'search'), x)


def _distinct(images: List[torch.Tensor]) -> List[torch.Tensor]:
    """``images`` without repeats (a candidate spliced into the realised batch breaks a sample with the image of
    the candidate it came from), in order."""
    out: List[torch.Tensor] = []
    for image in images:
        if not any(torch.equal(image, seen) for seen in out):
            out.append(image)
    return out


class IterateScores:
    """An ``observe`` hook for :func:`timm_hpm.attacks.apgd`: every whole batch the attack evaluates, scored on the
    target. An attack's per-sample best images come from different iterates, which a batch-dependent target never
    saw together; each iterate is a concrete batch within eps, so a sample it breaks is a realisable break.

    ``score(x_adv, logits)`` gives the target's per-sample correctness on ``x_adv``: the surrogate's ``logits`` when
    the surrogate is the target itself (no extra pass), else one forward of the target.
    """

    def __init__(self, batch: RealisedBatch, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.batch, self.score = batch, score
        self.broken = torch.zeros_like(batch.clean)
        self.images = batch.x.clone()  # per sample: the first batch's image that broke it
        self.best_x, self.best_correct = None, int(batch.clean.sum()) + 1

    def __call__(self, x_adv: torch.Tensor, logits: torch.Tensor) -> None:
        correct = self.score(x_adv, logits) & self.batch.clean
        new = self.batch.clean & ~correct & ~self.broken
        self.images[new] = x_adv[new]
        self.broken |= new
        if int(correct.sum()) < self.best_correct:
            self.best_x, self.best_correct = x_adv.clone(), int(correct.sum())
