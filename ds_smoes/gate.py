"""`ds_smoes.gate` is `ds_smoes.moe.gate`: the name that 0.1 code and docs import, kept as an alias of the
module itself (same object, so patching one patches the other).  New code imports `ds_smoes.moe.gate`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("ds_smoes.moe.gate")
