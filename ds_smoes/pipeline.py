"""`python -m ds_smoes.pipeline`: the MoE-LLaVA recipe, stages 0 to III, for one seed and gate (ds_smoes.app.pipeline_cli)."""
import sys

from ds_smoes.app.pipeline_cli import main

if __name__ == "__main__":
    sys.exit(main())
