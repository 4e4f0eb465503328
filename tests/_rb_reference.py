"""Deterministic weights for a state-dict layout, shared by the exact-logits test and the script that recorded the
reference logits with RobustBench's own architecture code (tests/fixtures/robustbench_reference_logits.json).

The weights are a function of the keys, the shapes and a seed only (drawn in sorted key order), so a test can
rebuild the very tensors RobustBench's model was run with, without shipping them: conv/linear weights He-scaled,
BatchNorm affine and running statistics near (1, 0), positive variances."""
import math
from typing import Dict, Iterable, Sequence, Tuple

import torch


def reference_weights(keys_and_shapes: Iterable[Tuple[str, Sequence[int]]], seed: int = 0) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted((k, tuple(s)) for k, s in keys_and_shapes):
        leaf = key.rsplit('.', 1)[-1]
        if leaf == 'num_batches_tracked':
            state[key] = torch.tensor(0, dtype=torch.long)
        elif leaf == 'running_var':
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif leaf in ('running_mean', 'bias'):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # BatchNorm weight
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:  # conv / linear weight
            fan_in = math.prod(shape[1:])
            state[key] = math.sqrt(2.0 / fan_in) * torch.randn(shape, generator=generator)
    return state


def reference_input(seed: int = 1, shape: Sequence[int] = (2, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed))
