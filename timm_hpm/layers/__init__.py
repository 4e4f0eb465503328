from .hpm_head import (HPM_MODES, HPM_OPTION_DOMAINS, HPM_OPTIONS, HPMHead, HPMOptionError, HPMOutput, check_hpm_option,
                       check_hpm_options)
