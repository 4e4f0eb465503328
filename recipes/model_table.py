"""The README's table of registered models, generated from timm's registry (the code: ``timm_hpm.cli.model_table``).

    python recipes/model_table.py            # print the table
    python recipes/model_table.py --update README.md
"""
from timm_hpm.cli.model_table import main

if __name__ == '__main__':
    main()
