"""Visual token compression (issue 19): which vision tokens reach the LLM, and how many.

    config.py       CompressConfig: method, budget, per-method settings (pydantic)

The methods and the design choices that are ours are in docs/compression.md.
"""
from ds_smoes.model.compress.config import IN_LLM_METHODS, PRE_LLM_METHODS, CompressConfig, CompressMethod

__all__ = ["IN_LLM_METHODS", "PRE_LLM_METHODS", "CompressConfig", "CompressMethod"]
