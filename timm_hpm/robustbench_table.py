"""The RobustBench bases this package supports: one declarative row each (facts recorded from the robustbench 1.1.1
model zoo and RobustBench's model_info files). Data, kept apart from the loader in timm_hpm/robustbench.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import timm
from timm.models import get_pretrained_cfg

from .models import hpm_variant, pretrained_model_args

__all__ = ['RobustBenchEntry', 'ROBUSTBENCH_MODELS']


@dataclass(frozen=True)
class RobustBenchEntry:
    """Where RobustBench keeps one base, which registered ``model.tag`` its weights are, and what RobustBench reports
    of it. The weights' own facts (number of classes, input normalisation, preprocessing, paper, a dropped checkpoint
    module) live with the tag in its family file (timm_hpm/models/), never here: adding a base is one entry plus its
    tag there."""
    name: str  # RobustBench's model name
    dataset: str  # cifar10 | cifar100 | imagenet
    threat_model: str  # Linf | L2
    architecture: str  # our registered timm architecture with the same state-dict keys
    tag: str  # our pretrained tag for the weights (registered for the architecture's hpm_ variant at least)
    gdrive_id: str  # where RobustBench hosts the file (Google Drive)
    eps: str  # RobustBench's leaderboard eps for the threat model
    # RobustBench's leaderboard figures, in percent, as its model_info/<dataset>/<threat>/<name>.json reports them
    # (None where it reports none)
    reported_clean: Optional[str] = None
    reported_autoattack: Optional[str] = None
    checkpoint_key: Optional[str] = None  # nesting inside RobustBench's file

    def name_tag(self, hpm: bool = False) -> str:
        """The registered model to create: ``<arch>.<tag>``, or the bare architecture where the tag is not
        registered for it (the plain ImageNet architectures are timm's own; their tag is their hpm_ variant's)."""
        arch = hpm_variant(self.architecture) if hpm else self.architecture
        return f'{arch}.{self.tag}' if f'{arch}.{self.tag}' in timm.list_models(arch, include_tags=True) else arch

    @property
    def model_args(self) -> Dict[str, Any]:
        """The model arguments of the tag (its ``num_classes`` and its family's per-tag arguments, the HPM
        options aside), for code that creates the bare architecture."""
        args = pretrained_model_args(f'{hpm_variant(self.architecture)}.{self.tag}')
        args.pop('hpm_cfg', None)
        return args

    @property
    def paper(self) -> str:
        return get_pretrained_cfg(f'{hpm_variant(self.architecture)}.{self.tag}').paper_ids

    @property
    def preprocessing(self) -> Optional[str]:
        """RobustBench's name of the test-time preprocessing (``Res256Crop224`` ...) for the ImageNet entries, from
        the tag's cfg notes; None for CIFAR (the images as they are)."""
        notes = get_pretrained_cfg(f'{hpm_variant(self.architecture)}.{self.tag}').notes or ()
        prefix = 'robustbench preprocessing: '
        found = [n[len(prefix):].split(' ', 1)[0] for n in notes if n.startswith(prefix)]
        return found[0] if found else None


# Facts from the robustbench 1.1.1 wheel's model zoo (name, architecture, gdrive id, preprocessing) and RobustBench's
# model_info JSON files (eps, clean and AutoAttack accuracy; GitHub RobustBench/robustbench at 78fcc9e, March 2025).
_E = RobustBenchEntry
ROBUSTBENCH_MODELS = (
    # CIFAR-10, Linf
    _E('Wang2023Better_WRN-28-10', 'cifar10', 'Linf', 'wrn28_10', 'rb_wang2023better_cifar10',
       '1-6MYKJdECDVGaWjj6GgqvaT95BGKhUvI', '8/255', '92.44', '67.31'),
    _E('Wang2023Better_WRN-70-16', 'cifar10', 'Linf', 'wrn70_16', 'rb_wang2023better_cifar10',
       '1-RF7ZSS-PAh6bfQcuqx4lh9bc9BUGnap', '8/255', '93.25', '70.69'),
    _E('Bartoldson2024Adversarial_WRN-94-16', 'cifar10', 'Linf', 'wrn94_16', 'rb_bartoldson2024adversarial_cifar10',
       '1g6o9H1b6vjoBi1USdCBt64C8B8LPiioX', '8/255', '93.68', '73.71'),
    _E('Bartoldson2024Adversarial_WRN-82-8', 'cifar10', 'Linf', 'wrn82_8', 'rb_bartoldson2024adversarial_cifar10',
       '1--jl8qJh624SFqFffvg1IkYR-fZGA2Sr', '8/255', '93.11', '71.59'),
    _E('Cui2023Decoupled_WRN-28-10', 'cifar10', 'Linf', 'wrn28_10', 'rb_cui2023decoupled_cifar10',
       '1-AaTrYt23WJFR22hXgBd-i6kjpsz6Hf2', '8/255', '92.16', '67.73'),
    _E('Rebuffi2021Fixing_70_16_cutmix_extra', 'cifar10', 'Linf', 'wrn70_16',
       'rb_rebuffi2021fixing_cutmix_extra_cifar10', '1qKDTp6IJ1BUXZaRtbYuo_t0tuDl_4mLg', '8/255', '92.23', '66.58'),
    _E('Gowal2021Improving_70_16_ddpm_100m', 'cifar10', 'Linf', 'wrn70_16', 'rb_gowal2021improving_ddpm_100m_cifar10',
       '10qBoDG_NomJBrRFeTsSwEcJF1GA-sjC4', '8/255', '88.74', '66.11'),
    _E('Gowal2020Uncovering_70_16_extra', 'cifar10', 'Linf', 'wrn70_16', 'rb_gowal2020uncovering_extra_cifar10',
       '1GxryYj_Or-VCDca0wgiFLz4ssXSZXQoJ', '8/255', '91.10', '65.88'),
    _E('Rebuffi2021Fixing_106_16_cutmix_ddpm', 'cifar10', 'Linf', 'wrn106_16',
       'rb_rebuffi2021fixing_cutmix_ddpm_cifar10', '1-4qnkveIkeWoGdF72kpEFHETiY3y4_tF', '8/255', '88.50', '64.64'),
    _E('Rebuffi2021Fixing_70_16_cutmix_ddpm', 'cifar10', 'Linf', 'wrn70_16', 'rb_rebuffi2021fixing_cutmix_ddpm_cifar10',
       '1-8CWRT-OFWyrz4T4s0I2mbFjPg8K_MUi', '8/255', '88.54', '64.25'),
    _E('Xu2023Exploring_WRN-28-10', 'cifar10', 'Linf', 'wrn28_10', 'rb_xu2023exploring_cifar10',
       '1k1uJI13ft0h0dfzuEihVpBvjBXwFRH2o', '8/255', '93.69', '63.89'),
    _E('Gowal2021Improving_28_10_ddpm_100m', 'cifar10', 'Linf', 'wrn28_10', 'rb_gowal2021improving_ddpm_100m_cifar10',
       '12L8YE6VBgUDKyW6GMSNefSYj2gg4LEKx', '8/255', '87.50', '63.44'),
    _E('Pang2022Robustness_WRN70_16', 'cifar10', 'Linf', 'wrn70_16', 'rb_pang2022robustness_cifar10',
       '1uQZYUuUiL9BzaQUeXLhjr_RhoyFRrHe3', '8/255', '89.01', '63.35'),
    _E('Carmon2019Unlabeled', 'cifar10', 'Linf', 'trades_wrn28_10', 'rb_carmon2019unlabeled_cifar10',
       '15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ', '8/255', '89.69', '59.53'),
    _E('Gowal2021Improving_R18_ddpm_100m', 'cifar10', 'Linf', 'dm_preact_resnet18',
       'rb_gowal2021improving_ddpm_100m_cifar10', '1-0EuCJashqSXEkkd1DOzFA4tH8KL2kim', '8/255', '87.35', '58.63'),
    _E('Rade2021Helper_R18_extra', 'cifar10', 'Linf', 'dm_preact_resnet18', 'rb_rade2021helper_extra_cifar10',
       '1hdXk1rPJql2Oa84Kky64fMTQzng5UcTL', '8/255', '89.02', '57.67'),
    _E('Rade2021Helper_R18_ddpm', 'cifar10', 'Linf', 'dm_preact_resnet18', 'rb_rade2021helper_ddpm_cifar10',
       '1f2yJUo-jxCQNk589frzriv6wPyrQEZdX', '8/255', '86.86', '57.09'),
    _E('Rebuffi2021Fixing_R18_ddpm', 'cifar10', 'Linf', 'dm_preact_resnet18', 'rb_rebuffi2021fixing_ddpm_cifar10',
       '1--dxE66AsgBSUsuK2sXCTrsYUV9B5f95', '8/255', '83.53', '56.66'),
    _E('Zhang2019Theoretically', 'cifar10', 'Linf', 'trades_wrn34_10', 'rb_zhang2019theoretically_cifar10',
       '1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_', '8/255', '84.92', '53.08'),
    _E('Andriushchenko2020Understanding', 'cifar10', 'Linf', 'preact_resnet18',
       'rb_andriushchenko2020understanding_cifar10', '1Uyvprd98bIyxfMjLdCZwm-NEJ-6GMVis', '8/255', '79.84', '43.93',
       checkpoint_key='last'),
    # CIFAR-10, L2
    _E('Wang2023Better_WRN-28-10', 'cifar10', 'L2', 'wrn28_10', 'rb_wang2023better_cifar10_l2',
       '1-fwKiJXEqHHUngt8wKsNnHuD4vAPvPXC', '0.5', '95.16', '83.68'),
    _E('Wang2023Better_WRN-70-16', 'cifar10', 'L2', 'wrn70_16', 'rb_wang2023better_cifar10_l2',
       '101UyURyte05tJLA9VFRBN6UDLyn-0sJw', '0.5', '95.54', '84.97'),
    _E('Rebuffi2021Fixing_70_16_cutmix_extra', 'cifar10', 'L2', 'wrn70_16',
       'rb_rebuffi2021fixing_cutmix_extra_cifar10_l2', '1JX82BDVBNO-Ffa2J37EuB8C-aFCbz708', '0.5', '95.74', '82.32'),
    _E('Gowal2020Uncovering_extra', 'cifar10', 'L2', 'wrn70_16', 'rb_gowal2020uncovering_extra_cifar10_l2',
       '1pkZDCpCBShpAnx92n8PUeNOY1fSiTi0s', '0.5', '94.74', '80.53'),
    _E('Rebuffi2021Fixing_70_16_cutmix_ddpm', 'cifar10', 'L2', 'wrn70_16',
       'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2', '1-8ECIOYF4JB0ywxJOmhkefnv4TW-KuXp', '0.5', '92.41', '80.42'),
    _E('Rebuffi2021Fixing_28_10_cutmix_ddpm', 'cifar10', 'L2', 'wrn28_10',
       'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2', '1-DUKcvfDzeWwt0NK7q2XvU-dIi8up8B0', '0.5', '91.79', '78.80'),
    _E('Sehwag2021Proxy', 'cifar10', 'L2', 'trades_wrn34_10', 'rb_sehwag2021proxy_cifar10_l2',
       '1UviikNzpltVFsgMuqQ8YhpmvGczGRS4S', '0.5', '90.93', '77.24'),
    _E('Rade2021Helper_R18_ddpm', 'cifar10', 'L2', 'dm_preact_resnet18', 'rb_rade2021helper_ddpm_cifar10_l2',
       '1VWrStAYy5CrUR18sjcpq_LKLpeqgUaoQ', '0.5', '90.57', '76.15'),
    _E('Rebuffi2021Fixing_R18_cutmix_ddpm', 'cifar10', 'L2', 'dm_preact_resnet18',
       'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2', '1-AlwHsXU28tCOJsf9RKAZxVzbinzzQU3', '0.5', '90.33', '75.86'),
    _E('Gowal2020Uncovering', 'cifar10', 'L2', 'wrn70_16', 'rb_gowal2020uncovering_cifar10_l2',
       '1QL4SNvYydjIg1uI3VP9SyNt-2kTXRisG', '0.5', '90.90', '74.50'),
    _E('Wu2020Adversarial', 'cifar10', 'L2', 'trades_wrn34_10', 'rb_wu2020adversarial_cifar10_l2',
       '1M5AZ0EZQt7d2AlTmsnqZcfx91-x7YEAV', '0.5', '88.51', '73.66'),
    # CIFAR-100, Linf
    _E('Wang2023Better_WRN-28-10', 'cifar100', 'Linf', 'wrn28_10', 'rb_wang2023better_cifar100',
       '1-jOu3wKWyw0XnBCXDGR32xn8Bw9GTJgh', '8/255', '72.58', '38.83'),
    _E('Wang2023Better_WRN-70-16', 'cifar100', 'Linf', 'wrn70_16', 'rb_wang2023better_cifar100',
       '1-yYcT73GP13c0y9HrgtpyB3NAfkGKgjY', '8/255', '75.22', '42.67'),
    _E('Cui2023Decoupled_WRN-28-10', 'cifar100', 'Linf', 'wrn28_10', 'rb_cui2023decoupled_cifar100',
       '15BwWdWbNfoarTEWWugicOVkTjh3nXH36', '8/255', '73.85', '39.18'),
    _E('Gowal2020Uncovering_extra', 'cifar100', 'Linf', 'wrn70_16', 'rb_gowal2020uncovering_extra_cifar100',
       '1LQBdwO2b391mg7VKcP6I0HIOpC6O83gn', '8/255', '69.15', '36.88'),
    _E('Rebuffi2021Fixing_70_16_cutmix_ddpm', 'cifar100', 'Linf', 'wrn70_16',
       'rb_rebuffi2021fixing_cutmix_ddpm_cifar100', '1-GkVLo9QaRjCJl-by67xda1ySVhYxsLV', '8/255', '63.56', '34.64'),
    _E('Pang2022Robustness_WRN70_16', 'cifar100', 'Linf', 'wrn70_16', 'rb_pang2022robustness_cifar100',
       '1F3kn8KIdBVls8QuTWc3BbB83htkQeVQD', '8/255', '65.56', '33.05'),
    _E('Cui2023Decoupled_WRN-34-10_autoaug', 'cifar100', 'Linf', 'trades_wrn34_10',
       'rb_cui2023decoupled_autoaug_cifar100', '18hjcLa1V3JTNUOshafLvw1ncxL2gu50M', '8/255', '65.93', '32.52'),
    _E('Rebuffi2021Fixing_28_10_cutmix_ddpm', 'cifar100', 'Linf', 'wrn28_10',
       'rb_rebuffi2021fixing_cutmix_ddpm_cifar100', '1-P7cs82Tj6UVx7Coin3tVurVKYwXWA9p', '8/255', '62.41', '32.06'),
    _E('Jia2022LAS-AT_34_20', 'cifar100', 'Linf', 'trades_wrn34_20', 'rb_jia2022las_at_cifar100',
       '1WhRq01Yl1v8O3skkrGUBuySlptidc5a6', '8/255', '67.31', '31.91'),
    _E('Cui2023Decoupled_WRN-34-10', 'cifar100', 'Linf', 'trades_wrn34_10', 'rb_cui2023decoupled_cifar100',
       '1whziIioVu5SGI1fBKyc331IfG_1MgenN', '8/255', '65.76', '31.91'),
    _E('Addepalli2022Efficient_WRN_34_10', 'cifar100', 'Linf', 'trades_wrn34_10', 'rb_addepalli2022efficient_cifar100',
       '1-3c-iniqNfiwGoGPHC3nSostnG6J9fDt', '8/255', '68.75', '31.85'),
    _E('Cui2020Learnable_34_10_LBGAT9_eps_8_255', 'cifar100', 'Linf', 'trades_wrn34_10',
       'rb_cui2020learnable_lbgat9_cifar100', '1TrUAN9opXBQa24WCTVtQTY-RkXK_3dmA', '8/255', '62.99', '31.20'),
    _E('Sehwag2021Proxy', 'cifar100', 'Linf', 'trades_wrn34_10', 'rb_sehwag2021proxy_cifar100',
       '1ejMNF2O4xkSdrjtZt2UXUeim-y9F7Req', '8/255', '65.93', '31.15'),
    _E('Gowal2020Uncovering', 'cifar100', 'Linf', 'wrn70_16', 'rb_gowal2020uncovering_cifar100',
       '16I86x2Vv_HCRKROC86G4dQKgO3Po5mT3', '8/255', '60.86', '30.03'),
    _E('Rade2021Helper_R18_ddpm', 'cifar100', 'Linf', 'dm_preact_resnet18', 'rb_rade2021helper_ddpm_cifar100',
       '1-qUvfOjq6x4I8mZynfGtzzCH_nvqS_VQ', '8/255', '61.50', '28.88'),
    _E('Rebuffi2021Fixing_R18_ddpm', 'cifar100', 'Linf', 'dm_preact_resnet18', 'rb_rebuffi2021fixing_ddpm_cifar100',
       '1-Qcph_EXw1SCYhDIl8cwqTQQy0sJKO8N', '8/255', '56.87', '28.50'),
    # ImageNet, Linf (the preprocessing is the tag's: RobustBenchEntry.preprocessing)
    _E('Liu2023Comprehensive_Swin-L', 'imagenet', 'Linf', 'swin_large_patch4_window7_224',
       'rb_liu2023comprehensive_imagenet', '1-57sQfcrsDsslfDR18nRD7FnpQmsSBk7', '4/255', '78.92', '59.56'),
    _E('Liu2023Comprehensive_ConvNeXt-L', 'imagenet', 'Linf', 'convnext_large', 'rb_liu2023comprehensive_imagenet',
       '1dIPLNfdQtAnqZrKPyuy3_zDI-FVgJ2FH', '4/255', '78.02', '58.48'),
    _E('Liu2023Comprehensive_Swin-B', 'imagenet', 'Linf', 'swin_base_patch4_window7_224',
       'rb_liu2023comprehensive_imagenet', '1-4mtxQCkThJUVdS3wvQ6NnmMZuySqR3c', '4/255', '76.16', '56.16'),
    _E('Liu2023Comprehensive_ConvNeXt-B', 'imagenet', 'Linf', 'convnext_base', 'rb_liu2023comprehensive_imagenet',
       '10-nSm-qUftvfKXHeOAakBQl8rxm-jCbk', '4/255', '76.02', '55.82'),
    _E('RodriguezMunoz2024Characterizing_Swin-L', 'imagenet', 'Linf', 'swin_large_patch4_window7_224',
       'rb_rodriguezmunoz2024characterizing_imagenet', '1-Dc9WhPU2wv4OMskLo1U57n5O8VbpNXv', '4/255', '79.36', '53.82'),
    _E('RodriguezMunoz2024Characterizing_Swin-B', 'imagenet', 'Linf', 'swin_base_patch4_window7_224',
       'rb_rodriguezmunoz2024characterizing_imagenet', '1-BSUjoFXx3PP-TfeE5fjbofO2lLyUf56', '4/255', '77.76', '51.56'),
    _E('Chen2024Data_WRN_50_2', 'imagenet', 'Linf', 'wide_resnet50_2', 'rb_chen2024data_imagenet',
       '1-PBlZVILAKFQ7mF8srKjdkTKJZAr61Uf', '4/255', '68.76', '40.60'),
    _E('Mo2022When_Swin-B', 'imagenet', 'Linf', 'swin_base_patch4_window7_224', 'rb_mo2022when_imagenet',
       '1-SXi4Z2X6Zo_j8EO4slJcBMXNej8fKUd', '4/255', '74.66', '38.30'),
    _E('Salman2020Do_50_2', 'imagenet', 'Linf', 'wide_resnet50_2', 'rb_salman2020do_imagenet',
       '1OT7xaQYljrTr3vGbM37xK9SPoPJvbSKB', '4/255', '68.46', '38.14'),
    _E('Salman2020Do_R50', 'imagenet', 'Linf', 'resnet50', 'rb_salman2020do_imagenet',
       '1TmT5oGa1UvVjM3d-XeSj_XmKqBNRUg8r', '4/255', '64.02', '34.96'),
    _E('Mo2022When_ViT-B', 'imagenet', 'Linf', 'vit_base_patch16_224', 'rb_mo2022when_imagenet',
       '1-dUFdvDBflqMsMLjZv3wlPJTm-Jm7net', '4/255', '68.38', '34.40'),
    _E('Engstrom2019Robustness', 'imagenet', 'Linf', 'resnet50', 'rb_engstrom2019robustness_imagenet',
       '1T2Fvi1eCJTeAOEzrH_4TAIwO8HTOYVyn', '4/255', '62.56', '29.22'),
    _E('Wong2020Fast', 'imagenet', 'Linf', 'resnet50', 'rb_wong2020fast_imagenet',
       '1deM2ZNS5tf3S_-eRURJi-IlvUL8WJQ_w', '4/255', '55.62', '26.24'),
)
