import sys

from ds_smoes.sweep.cli import main

sys.exit(main())
