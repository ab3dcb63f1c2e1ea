"""The parallel layer: process groups, collectives and moving rows or experts between EP ranks.

    distributed.py  rank / world queries and the few collectives the package uses
    launch.py       joining the launcher's process group (threads, backend, teardown)
    dispatch.py     the rank_once dispatch and the byte accounting of both dispatches
    migration.py    moving experts (weights + optimizer state) onto their planned ranks

Imports `ds_smoes.core` and torch; nothing above (DeepSpeed's gate and layer are `ds_smoes.moe`).
"""
