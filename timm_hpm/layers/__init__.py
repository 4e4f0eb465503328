from .hpm_head import HPM_MODES, HPMHead, HPMOutput
