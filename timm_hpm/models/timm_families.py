"""``hpm_`` variants of the timm ImageNet families that robust ImageNet checkpoints use.

Each is timm's own architecture (same state-dict keys, so RobustBench's ImageNet checkpoints of these
families load after their ``model.`` wrapper prefix is stripped) with its classifier converted by
``convert_to_hpm``. Inputs follow timm's convention: normalised outside the model with the pretrained cfg's
mean/std (evaluation wraps the normalisation into the attacked model). Each pretrained cfg starts from the
base architecture's own (``fixed_input_size``, ``pool_size``, ``crop_mode`` ... stay true for the hpm_ variant);
the weights' own facts (preprocessing, licence, paper) override it.
"""
from typing import NamedTuple, Tuple, Union

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

from ._builder import build_family

__all__ = ['HPM_TIMM_FAMILIES', 'TimmFamily']


class TimmFamily(NamedTuple):
    hpm_name: str  # the registered HPM model
    classifier: str  # the linear classifier module
    first_conv: str
    out_indices: Union[int, Tuple[int, ...]]  # the feature levels timm's own factory returns


#: base timm architecture -> its HPM variant. The ViT's name keeps timm's 'vit_' family prefix: timm's tools (its
#: model tests among them) recognise token-output models by name, and an 'hpm_' prefix would hide it.
HPM_TIMM_FAMILIES = {
    'resnet50': TimmFamily('hpm_resnet50', 'fc', 'conv1', (0, 1, 2, 3, 4)),
    'wide_resnet50_2': TimmFamily('hpm_wide_resnet50_2', 'fc', 'conv1', (0, 1, 2, 3, 4)),
    'convnext_base': TimmFamily('hpm_convnext_base', 'head.fc', 'stem.0', (0, 1, 2, 3)),
    'convnext_large': TimmFamily('hpm_convnext_large', 'head.fc', 'stem.0', (0, 1, 2, 3)),
    'swin_base_patch4_window7_224': TimmFamily('hpm_swin_base_patch4_window7_224', 'head.fc', 'patch_embed.proj',
                                               (0, 1, 2, 3)),
    'swin_large_patch4_window7_224': TimmFamily('hpm_swin_large_patch4_window7_224', 'head.fc', 'patch_embed.proj',
                                                (0, 1, 2, 3)),
    'vit_base_patch16_224': TimmFamily('vit_base_patch16_hpm_224', 'head', 'patch_embed.proj', 3),  # last 3 blocks
}


def _create(base: str, pretrained: bool = False, **kwargs):
    family = HPM_TIMM_FAMILIES[base]

    def base_model(**model_kwargs):
        return timm.create_model(base, pretrained=False, **model_kwargs)

    # timm's feature extraction through forward_intermediates, which every one of these families has
    return build_family(base_model, family.hpm_name, pretrained, classifier=family.classifier, hpm=True,
                        feature_cfg=dict(feature_cls='getter', out_indices=family.out_indices), **kwargs)


# Facts of the base's own weights, not of ours.
_WEIGHT_FACTS = ('url', 'hf_hub_id', 'hf_hub_filename', 'hf_hub_revision', 'file', 'state_dict', 'source',
                 'architecture', 'tag', 'custom_load', 'license', 'description', 'origin_url', 'paper_name',
                 'paper_ids', 'notes', 'test_input_size', 'test_crop_pct')


def _pool_size_at(base_cfg: dict, input_size: Tuple[int, int, int]) -> Tuple[int, int]:
    """The unpooled feature map of the base at another input size: its ``pool_size`` scaled by the input's (the
    network's stride is ``input / pool_size``); an input the stride does not divide is an error, not a guess."""
    (_, base_h, base_w), (pool_h, pool_w) = base_cfg['input_size'], base_cfg['pool_size']
    if base_h % pool_h or base_w % pool_w:
        raise ValueError(f"{base_cfg['architecture']}: no whole stride from input {base_cfg['input_size']} to "
                         f"pool_size {(pool_h, pool_w)}")
    stride_h, stride_w = base_h // pool_h, base_w // pool_w
    _, h, w = input_size
    if h % stride_h or w % stride_w:
        raise ValueError(f"input size {input_size} is not a multiple of {base_cfg['architecture']}'s stride "
                         f"{(stride_h, stride_w)}: give the tag its pool_size explicitly")
    return h // stride_h, w // stride_w


def _cfg(base: str, **kwargs):
    family = HPM_TIMM_FAMILIES[base]
    base_cfg = {k: v for k, v in get_pretrained_cfg(base).to_dict().items() if k not in _WEIGHT_FACTS}
    if 'input_size' in kwargs and base_cfg.get('pool_size') and 'pool_size' not in kwargs:
        # a tag evaluated at another size than the base (Wong2020Fast: 288): timm's cfg tests read the unpooled
        # feature map's size from pool_size, so it follows the input size
        kwargs['pool_size'] = _pool_size_at({**base_cfg, 'architecture': base}, kwargs['input_size'])
    return {
        **base_cfg, 'num_classes': 1000, 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': family.first_conv, 'classifier': family.classifier, **kwargs,
    }


# RobustBench's preprocessing of each weight's ImageNet evaluation (robustbench.data.PREPROCESSINGS), as a note; the
# cfg's crop_pct/interpolation/input_size follow it as far as timm's eval transform can.
_RES256_CROP224 = dict(crop_pct=0.875, interpolation='bilinear', notes=('robustbench preprocessing: Res256Crop224',))
_BICUBIC_RES256_CROP224 = dict(crop_pct=0.875, interpolation='bicubic',
                               notes=('robustbench preprocessing: BicubicRes256Crop224',))
# Resize([224, 224]): both sides to 224 (timm's default eval transform keeps the aspect ratio)
_RES224 = dict(crop_pct=1.0, interpolation='bilinear', notes=('robustbench preprocessing: Res224 (resize both sides '
                                                              'to 224, aspect ratio not kept)',))
# CenterCrop(288) of the unresized image (timm's eval transform resizes first); the unpooled feature map follows the
# input size (a stride-32 ResNet-50: 9x9, where the base's 224 gives 7x7): _cfg scales pool_size
_CROP288 = dict(input_size=(3, 288, 288), crop_pct=1.0, interpolation='bilinear',
                notes=('robustbench preprocessing: Crop288 (centre crop 288 of the unresized image)',))

_SALMAN = dict(paper_ids='arXiv:2007.08489', paper_name='Do Adversarially Robust ImageNet Models Transfer Better?',
               origin_url='https://github.com/microsoft/robust-models-transfer', license='mit', **_RES256_CROP224)
_LIU = dict(paper_ids='arXiv:2302.14301', paper_name='A Comprehensive Study on Robustness of Image Classification '
            'Models: Benchmarking and Rethinking', origin_url='https://github.com/thu-ml/ares', license='unknown',
            **_BICUBIC_RES256_CROP224)
_MO = dict(paper_ids='arXiv:2210.07540', paper_name='When Adversarial Training Meets Vision Transformers',
           origin_url='https://github.com/mo666666/When-Adversarial-Training-Meets-Vision-Transformers',
           license='unknown', **_RES224)
# The newer weights' papers as RobustBench's model_info links them.
_WONG = dict(paper_ids='arXiv:2001.03994', paper_name='Fast is better than free: Revisiting adversarial training',
             origin_url='https://arxiv.org/abs/2001.03994', license='unknown', **_CROP288)
_ENGSTROM = dict(paper_ids='https://github.com/MadryLab/robustness', paper_name='Robustness library',
                 origin_url='https://github.com/MadryLab/robustness', license='mit', **_RES256_CROP224)
# Chen2024Data's WRN-50-2 has no normalisation layer: it takes images in [0, 1] (mean 0, std 1).
_CHEN2024 = dict(paper_ids='doi:10.1016/j.patcog.2024.110394', paper_name='Data filtering for efficient '
                 'adversarial training', origin_url='https://doi.org/10.1016/j.patcog.2024.110394', license='unknown',
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **_RES256_CROP224)
_RODRIGUEZ_MUNOZ = dict(paper_ids='arXiv:2409.20139', paper_name='Characterizing Model Robustness via Natural Input '
                        'Gradients', origin_url='https://arxiv.org/abs/2409.20139', license='unknown',
                        **_BICUBIC_RES256_CROP224)


def _weights(base: str, tag: str, **kwargs):
    # Not published yet (no location: timm does not list them as pretrained); loaded through timm_hpm.robustbench.
    return {f'{HPM_TIMM_FAMILIES[base].hpm_name}.{tag}': _cfg(base, **kwargs)}


# The first tag of a model is its default cfg (test_hpm_timm_variant_keeps_the_base_cfg: the base's input size).
default_cfgs = generate_default_cfgs({
    **_weights('resnet50', 'rb_salman2020do_imagenet', **_SALMAN),
    **_weights('resnet50', 'rb_engstrom2019robustness_imagenet', **_ENGSTROM),
    **_weights('resnet50', 'rb_wong2020fast_imagenet', **_WONG),
    **_weights('wide_resnet50_2', 'rb_salman2020do_imagenet', **_SALMAN),
    **_weights('wide_resnet50_2', 'rb_chen2024data_imagenet', **_CHEN2024),
    **_weights('convnext_base', 'rb_liu2023comprehensive_imagenet', **_LIU),
    **_weights('convnext_large', 'rb_liu2023comprehensive_imagenet', **_LIU),
    **_weights('swin_base_patch4_window7_224', 'rb_liu2023comprehensive_imagenet', **_LIU),
    **_weights('swin_base_patch4_window7_224', 'rb_mo2022when_imagenet', **_MO),
    **_weights('swin_base_patch4_window7_224', 'rb_rodriguezmunoz2024characterizing_imagenet', **_RODRIGUEZ_MUNOZ),
    **_weights('swin_large_patch4_window7_224', 'rb_liu2023comprehensive_imagenet', **_LIU),
    **_weights('swin_large_patch4_window7_224', 'rb_rodriguezmunoz2024characterizing_imagenet',
               **_RODRIGUEZ_MUNOZ),
    **_weights('vit_base_patch16_224', 'rb_mo2022when_imagenet', **_MO),
})


@register_model
def hpm_resnet50(pretrained: bool = False, **kwargs):
    """timm ResNet-50 with the HPM l2-reclassifier head."""
    return _create('resnet50', pretrained, **kwargs)


@register_model
def hpm_wide_resnet50_2(pretrained: bool = False, **kwargs):
    """timm Wide-ResNet-50-2 with the HPM l2-reclassifier head."""
    return _create('wide_resnet50_2', pretrained, **kwargs)


@register_model
def hpm_convnext_base(pretrained: bool = False, **kwargs):
    """timm ConvNeXt-B with the HPM l2-reclassifier head."""
    return _create('convnext_base', pretrained, **kwargs)


@register_model
def hpm_convnext_large(pretrained: bool = False, **kwargs):
    """timm ConvNeXt-L with the HPM l2-reclassifier head."""
    return _create('convnext_large', pretrained, **kwargs)


@register_model
def hpm_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs):
    """timm Swin-B (patch 4, window 7, 224) with the HPM l2-reclassifier head."""
    return _create('swin_base_patch4_window7_224', pretrained, **kwargs)


@register_model
def hpm_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs):
    """timm Swin-L (patch 4, window 7, 224) with the HPM l2-reclassifier head."""
    return _create('swin_large_patch4_window7_224', pretrained, **kwargs)


@register_model
def vit_base_patch16_hpm_224(pretrained: bool = False, **kwargs):
    """timm ViT-B/16 (224) with the HPM l2-reclassifier head."""
    return _create('vit_base_patch16_224', pretrained, **kwargs)
