"""The tiny architectures and data of ds_smoes.hf.tiny, for tests/test_hf_*.py."""
from ds_smoes.hf.tiny import *  # noqa: F401,F403
from ds_smoes.hf.tiny import IMAGE_ID, LLAVA_TEXT  # noqa: F401
