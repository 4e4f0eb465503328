"""Progress a user can follow inside one batch's attack: a long evaluation is a few large batches, each minutes to
hours of attack, so the runner's one tick per batch says little. :class:`StageProgress` shows a second tqdm line
per MSA stage (AutoAttack on the target, APGD through each view, the combinations), advanced by every batch an
attack evaluates (APGD's iterations)."""
from __future__ import annotations

from typing import Optional

from tqdm import tqdm

__all__ = ['StageProgress']


class StageProgress:
    """One tqdm line for the stage running now (``stage``), ticked by the attack's iterations (``tick``). Disabled,
    every call does nothing (the in-memory :func:`~timm_hpm.eval.msa` and the processes of a sharded run other than
    the first). ``position``: the line under the runner's per-batch bar."""

    def __init__(self, enabled: bool = True, position: int = 1, batch: str = ''):
        self.enabled, self.position, self.batch = enabled, position, batch
        self._bar: Optional[tqdm] = None

    def stage(self, name: str, total: Optional[int] = None) -> None:
        """A new stage: ``name`` as the line's label, ``total`` the iterations it will take (None: unknown)."""
        self.close()
        if self.enabled:
            label = f'{self.batch}: {name}' if self.batch else name
            self._bar = tqdm(total=total, desc=label, position=self.position, leave=False, unit='it')

    def tick(self, n: int = 1) -> None:
        """``n`` more iterations of the running stage (never past its total: APGD's restarts evaluate a few batches
        more than its iterations)."""
        bar = self._bar
        if bar is not None and (bar.total is None or bar.n < bar.total):
            bar.update(n if bar.total is None else min(n, bar.total - bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
