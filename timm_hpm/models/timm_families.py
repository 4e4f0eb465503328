"""``hpm_`` variants of the timm ImageNet families that robust ImageNet checkpoints use.

Each is timm's own architecture (same state-dict keys, so RobustBench's ImageNet checkpoints of these
families load after their ``model.`` wrapper prefix is stripped) with its classifier converted by
``convert_to_hpm``. Inputs follow timm's convention: normalised outside the model with the pretrained cfg's
mean/std (evaluation wraps the normalisation into the attacked model).
"""
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ._builder import build_family, hub_id

__all__ = ['HPM_TIMM_FAMILIES']

#: hpm_<base> -> (base timm architecture, classifier module, first conv)
HPM_TIMM_FAMILIES = {
    'resnet50': ('fc', 'conv1'),
    'wide_resnet50_2': ('fc', 'conv1'),
    'convnext_base': ('head.fc', 'stem.0'),
    'convnext_large': ('head.fc', 'stem.0'),
    'swin_base_patch4_window7_224': ('head.fc', 'patch_embed.proj'),
    'vit_base_patch16_224': ('head', 'patch_embed.proj'),
}


def _create(base: str, pretrained: bool = False, **kwargs):
    classifier, _ = HPM_TIMM_FAMILIES[base]

    def base_model(**model_kwargs):
        return timm.create_model(base, pretrained=False, **model_kwargs)

    return build_family(base_model, f'hpm_{base}', pretrained, classifier=classifier, hpm=True, **kwargs)


def _cfg(base: str, **kwargs):
    classifier, first_conv = HPM_TIMM_FAMILIES[base]
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': first_conv, 'classifier': classifier, **kwargs,
    }


_SALMAN = dict(paper_ids='arXiv:2007.08489', paper_name='Do Adversarially Robust ImageNet Models Transfer Better?',
               origin_url='https://github.com/microsoft/robust-models-transfer', license='mit',
               crop_pct=0.875, interpolation='bilinear')
_LIU = dict(paper_ids='arXiv:2302.14301', paper_name='A Comprehensive Study on Robustness of Image Classification '
            'Models: Benchmarking and Rethinking', origin_url='https://github.com/thu-ml/ares', license='unknown',
            crop_pct=0.875, interpolation='bicubic')
_MO = dict(paper_ids='arXiv:2210.07540', paper_name='When Adversarial Training Meets Vision Transformers',
           origin_url='https://github.com/mo666666/When-Adversarial-Training-Meets-Vision-Transformers',
           license='unknown', crop_pct=1.0, interpolation='bilinear')


def _weights(base: str, tag: str, **kwargs):
    name = f'hpm_{base}.{tag}'
    return {name: _cfg(base, hf_hub_id=hub_id(name), **kwargs)}


default_cfgs = generate_default_cfgs({
    **_weights('resnet50', 'rb_salman2020do_imagenet', **_SALMAN),
    **_weights('wide_resnet50_2', 'rb_salman2020do_imagenet', **_SALMAN),
    **_weights('convnext_base', 'rb_liu2023comprehensive_imagenet', **_LIU),
    **_weights('convnext_large', 'rb_liu2023comprehensive_imagenet', **_LIU),
    **_weights('swin_base_patch4_window7_224', 'rb_liu2023comprehensive_imagenet', **_LIU),
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
def hpm_vit_base_patch16_224(pretrained: bool = False, **kwargs):
    """timm ViT-B/16 (224) with the HPM l2-reclassifier head."""
    return _create('vit_base_patch16_224', pretrained, **kwargs)
