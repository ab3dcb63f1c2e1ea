"""`ds_smoes.metrics` is `ds_smoes.core.metrics`: the name that 0.1 code and docs import, kept as an alias of the
module itself (same object, so patching one patches the other).  New code imports `ds_smoes.core.metrics`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("ds_smoes.core.metrics")
