"""Model families; importing this package registers them with timm."""
from ._builder import HF_HUB_ORG, PretrainedWeightsUnavailable, clean_checkpoint, hpm_checkpoint_filter, hub_id
from ._hpm import HPMModelMixin, convert_to_hpm, get_hpm_head, is_hpm_model
from .preact_resnet import PreActResNet
from .small_cnn import SmallCNN
from .timm_families import HPM_TIMM_FAMILIES
from .trades_wide_resnet import TradesWideResNet
from .wide_resnet import DMWideResNet
