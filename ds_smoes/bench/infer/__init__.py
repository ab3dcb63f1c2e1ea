"""`python -m ds_smoes.bench infer`: serving the trained models with the KV cache at several EP sizes; with
`--shapes`, one decoder block at published model shapes and the projection to the whole model.

    command.py        the command: models found or trained, the worker launched per EP size, the table
    worker.py         one EP rank: traffic and paired timing of prefill and decode, accuracy
    variants.py       what is served (dense, top-k, hard routing, SMoES, ...)
    shapes.py         --shapes: the published decoder-block shapes
    block.py          --shapes: the block (a converted transformers decoder layer), its variants and workloads
    block_worker.py   --shapes: one EP rank: paired timing, bytes and peak memory of the variants
    projection.py     --shapes: one block to the whole model at 2..64 EP ranks (compute + all-to-all model)
    scale_command.py  --shapes: the command: router statistics, the worker, figures, bars, projection, MLflow
"""
