"""`python -m ds_smoes.compare`: the gate comparison table.  It lives in `ds_smoes.app.compare`; this
module keeps the command's name."""
import sys

from ds_smoes.app.compare import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
