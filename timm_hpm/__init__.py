"""timm-hpm: the Hybrid Prototype Mixing (HPM) l2-reclassifier as timm models.

``import timm_hpm`` registers the ``hpm_*`` models (and the plain CIFAR families they build on) with timm.
"""
from .layers import HPM_MODES, HPMHead, HPMOutput
from .models import (HF_HUB_ORG, HPMModelMixin, PretrainedWeightsUnavailable, clean_checkpoint, convert_to_hpm,
                     get_hpm_head, hpm_variant, hub_id, is_hpm_model, is_hpm_variant)
from .version import __version__
from .benchmark import benchmark


def list_models(pretrained: bool = False) -> list:
    """Every model timm-hpm registers (the plain families and their HPM variants), sorted: those of every family
    file in ``timm_hpm/models/`` (a new family file needs no other edit)."""
    import pkgutil

    import timm

    from . import models
    families = [m.name for m in pkgutil.iter_modules(models.__path__) if not m.name.startswith('_')]
    return sorted(set(timm.list_models(module=families, pretrained=pretrained)))
