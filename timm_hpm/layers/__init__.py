from .hpm_head import HPM_MODES, HPM_OPTIONS, HPMHead, HPMOutput
