"""`python -m ds_smoes.export`: the deployment export.  It lives in `ds_smoes.app.export`; this module
keeps the command's name."""
import sys

from ds_smoes.app.export import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
