"""Benchmarks of expert-parallel communication and speed (docs/bench.md), one package each:

    python -m ds_smoes.bench comm       # comm/: measured on 2 gloo ranks: bytes, rank figures, ms/step, accuracy
    python -m ds_smoes.bench simulate   # simulate/: expected bytes per token for 2..64 EP ranks and 8..256 experts
    python -m ds_smoes.bench scale      # scale/: one MoE layer and the attention score at published shapes
    python -m ds_smoes.bench infer      # infer/: serving the trained models with the KV cache
    python -m ds_smoes.bench infer --shapes   # infer/: one decoder block at published shapes, projected to 64 ranks

Shared: cli.py (the command line), runs.py (the trained models: found or trained).  Progress lines and
user-fixable errors print through `ds_smoes.parallel.console`.
"""
