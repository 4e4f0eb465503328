"""The registered models at the sizes the tests build them (shared by the model and conformance tests)."""
import timm_hpm

ALL_MODELS = timm_hpm.list_models()
HPM_MODELS = [m for m in ALL_MODELS if timm_hpm.is_hpm_variant(m)]
PLAIN_MODELS = [m for m in ALL_MODELS if not timm_hpm.is_hpm_variant(m)]
SHIPPED_TAGS = timm_hpm.list_models(pretrained=True)

# Checked at reduced width where full size would cost seconds of CPU per test (same code path, same keys
# pattern); their full-size key lists are checked against RobustBench in test_models.py.
REDUCED = {
    'wrn70_16': dict(width=2), 'hpm_wrn70_16': dict(width=2),
    'trades_wrn34_20': dict(widen_factor=2), 'hpm_trades_wrn34_20': dict(widen_factor=2),
    'trades_wrn34_10': dict(widen_factor=2), 'hpm_trades_wrn34_10': dict(widen_factor=2),
    'wrn28_10': dict(width=2), 'hpm_wrn28_10': dict(width=2),
    'trades_wrn28_10': dict(widen_factor=2), 'hpm_trades_wrn28_10': dict(widen_factor=2),
    # the deeper DM WideResNets at a depth the CPU tests afford (same blocks; full-size keys: test_robustbench_archs.py)
    'wrn82_8': dict(depth=16, width=2), 'hpm_wrn82_8': dict(depth=16, width=2),
    'wrn94_16': dict(depth=16, width=2), 'hpm_wrn94_16': dict(depth=16, width=2),
    'wrn106_16': dict(depth=16, width=2), 'hpm_wrn106_16': dict(depth=16, width=2),
}
# The ImageNet families are timm's own (tested by timm); here at reduced depth/width where timm allows it.
IMAGENET_REDUCED = {
    'hpm_convnext_base': dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    'hpm_convnext_large': dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    'hpm_swin_base_patch4_window7_224': dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 2, 4)),
    'hpm_swin_large_patch4_window7_224': dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 2, 4)),
    'vit_base_patch16_hpm_224': dict(depth=3, embed_dim=32, num_heads=2),
    'hpm_resnet50': dict(layers=(1, 1, 1, 1)),
    'hpm_wide_resnet50_2': dict(layers=(1, 1, 1, 1)),
}
# timm's own test file treats token-output models (ViT) as non-standard: no NCHW feature map, no pool_size.
TOKEN_MODELS = {'vit_base_patch16_hpm_224'}


def reduced_kwargs(name: str) -> dict:
    return {**REDUCED.get(name, {}), **IMAGENET_REDUCED.get(name, {})}
