"""`python -m ds_smoes.pretrain_vision`: the recipe's stage 0, the pretrained vision encoder (ds_smoes.app.pretrain_vision)."""
import sys

from ds_smoes.app.pretrain_vision import main

if __name__ == "__main__":
    sys.exit(main())
