import sys

from ds_smoes.bench.cli import main

sys.exit(main())
