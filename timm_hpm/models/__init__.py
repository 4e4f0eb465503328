"""Model families; importing this package registers them with timm."""
from ._builder import hpm_base_model, pretrained_model_args
from ._checkpoint import check_finite_weights, clean_checkpoint, hpm_checkpoint_filter
from ._weights import HF_HUB_ORG, PretrainedWeightsUnavailable, UnusableWeights, check_local_dir, hub_id
from ._hpm import HPMModelMixin, convert_to_hpm, get_hpm_head, is_hpm_model
from .dm_preact_resnet import DMPreActResNet
from .preact_resnet import PreActResNet
from .small_cnn import SmallCNN
from .tbn_small_cnn import TBNSmallCNN
from .timm_families import HPM_TIMM_FAMILIES
from .trades_wide_resnet import TradesWideResNet
from .wide_resnet import DMWideResNet


def hpm_variant(arch: str) -> str:
    """The registered HPM model of a base architecture: ``'hpm_' + arch``, except where a timm family's naming
    says otherwise (``vit_base_patch16_224`` -> ``vit_base_patch16_hpm_224``)."""
    family = HPM_TIMM_FAMILIES.get(arch)
    return family.hpm_name if family is not None else f'hpm_{arch}'


def is_hpm_variant(name: str) -> bool:
    """Whether a registered model name (with or without a pretrained tag) is an HPM model."""
    name = name.split('.')[0]
    return name.startswith('hpm_') or name in {family.hpm_name for family in HPM_TIMM_FAMILIES.values()}
