"""Visual token compression (issue 19): which vision tokens reach the LLM, and how many.

    config.py       CompressConfig: method, budget, per-method settings (pydantic)
    base.py         CompressOutput and TokenCompressor: patches (and the text query) in, the kept tokens out
    learnpruner.py  LearnPruner's stage 1: a learned scorer and a straight-through / Gumbel top-k
    qmop.py         QMoP: pooling, resampler and pruning branches fused by a query-guided router
    baselines.py    random pruning and pooling to the budget
    build.py        build_compressor(ModelConfig): the module for cfg.compress (None: no pre-LLM stage)

The in-LLM stage (LearnPruner's stage 2, the FastV-style baseline) is `ds_smoes.compress.in_llm`; the math
both use is in `ds_smoes.compress.selection` and `ds_smoes.compress.query_attention`.

The methods and the design choices that are ours are in docs/compression.md.
"""
from ds_smoes.compress.config import IN_LLM_METHODS, PRE_LLM_METHODS, CompressConfig, CompressMethod

__all__ = ["IN_LLM_METHODS", "PRE_LLM_METHODS", "CompressConfig", "CompressMethod"]
