"""OLMoE (`olmoe`): top-k of the softmax, renormalised only when `norm_topk_prob`; no shared experts."""
from ds_smoes.hf.adapters.base import register_block
from ds_smoes.hf.adapters.fused import FusedTopKBlock

register_block(FusedTopKBlock("OlmoeSparseMoeBlock"))
