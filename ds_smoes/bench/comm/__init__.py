"""`python -m ds_smoes.bench comm`: EP communication measured on 2 gloo ranks (docs/bench.md).

    command.py   the command: trained models found or trained, the worker launched, the report written
    worker.py    one EP rank of the measurement (launched by DeepSpeed's launcher)
    variants.py  what is compared (gate, dispatch, bin limit)
    routes.py    the routes each MoE call made (a RoutingCollector that keeps them), router statistics, and the
                 bytes each dispatch must send, computed from the routes
    report.py    the table and JSON, paired ratios
"""
