"""`python -m ds_smoes.bench infer`: serving the trained models with the KV cache at several EP sizes.

    command.py   the command: models found or trained, the worker launched per EP size, the table
    worker.py    one EP rank: traffic and paired timing of prefill and decode, accuracy
    variants.py  what is served (dense, top-k, hard routing, SMoES, ...)
"""
