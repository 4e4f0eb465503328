"""Attacks as plain functions on whole, fixed batches (never re-batched, so a batch-dependent model is attacked
on exactly the batch that is scored), and what they check and wrap.

* :func:`pgd`: Madry et al.'s PGD (the fine-tuning attack);
* :func:`apgd`, :func:`apgd_targeted`: Auto-PGD with per-sample step sizes (the MSA's surrogate attacks);
* :func:`each_image_alone`: a model run on every image as its own batch (a per-image attack on a
  batch-dependent head);
* :func:`project`, :func:`ascent_direction`, :func:`random_init`: the threat model's geometry they share.
"""
from ._ball import ascent_direction, project, random_init
from .apgd import APGD_LOSSES, apgd, apgd_targeted, checkpoints, dlr_loss, targeted_dlr_loss
from .inputs import (NormalizedInput, accuracy, check_count, check_eps, check_flag, check_images, each_image_alone,
                     normalized_view, option_label, parse_eps)
from .pgd import pgd

__all__ = ['pgd', 'apgd', 'apgd_targeted', 'APGD_LOSSES', 'checkpoints', 'dlr_loss', 'targeted_dlr_loss', 'project',
           'ascent_direction', 'random_init', 'parse_eps', 'check_eps', 'check_count', 'check_flag', 'option_label',
           'check_images', 'accuracy', 'NormalizedInput',
           'normalized_view', 'each_image_alone']
