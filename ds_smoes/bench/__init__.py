"""Benchmarks of expert-parallel communication (docs/bench.md).

    python -m ds_smoes.bench comm       # measured on 2 gloo ranks: bytes, rank figures, ms/step, accuracy
    python -m ds_smoes.bench simulate   # expected bytes per token for 2..64 EP ranks and 8..256 experts

Modules: variants.py (what is compared), routes.py (routes recorded by hooks, router statistics,
bytes expected from the routes), worker.py (one EP rank of the measurement), runs.py (the trained
models: found or trained), report.py (table and JSON), simulate.py (the statistical model),
simulate_report.py (its table and plot), comm.py and cli.py (the commands).
"""
