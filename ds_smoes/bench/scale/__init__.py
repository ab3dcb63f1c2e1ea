"""`python -m ds_smoes.bench scale`: one MoE layer and the attention score at published model shapes.

    command.py           the command: the router profile, the worker launched, the table and bars
    worker.py            one EP rank: the layer's variants, paired rounds
    shapes.py            the published shapes (OLMoE, Qwen3-VL, DeepSeek-VL2-Tiny, toy)
    synthetic_routes.py  routes drawn from a router profile or uniformly
    attention.py         the attention score's time and peak memory against attention alone
"""
