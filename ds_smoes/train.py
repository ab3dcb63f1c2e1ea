"""`python -m ds_smoes.train` (and the DeepSpeed launcher's `--module ds_smoes.train`): the training
command.  It lives in `ds_smoes.app.train`; this module keeps the command's name."""
import sys

from ds_smoes.app.train import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
