"""The method core: pure torch math and small state modules, nothing distributed.

    scores.py        soft modality scores: attention update, Gaussian statistics, hard labels
    binning.py       the expert-to-bin map (fixed or adaptive) and its per-step update
    losses.py        reference inter-bin MI, bin balance and KL-band losses (docs/method.md, "Losses")
    fused_losses.py  the MI and bin balance from one pass over the routes (what the gate runs)
    routing.py       top-k, bin-limited top-k, slots and capacity: the sparse-route contract
    metrics.py       MSI, expert-modality load, cross-rank figures of routes
    placement.py     placement *planning*: which physical id each expert takes
    attention_score.py  the attention score by a second fused attention call
    step_state.py    what forwards record and optimizer steps apply
    validation.py    checks of the layer's inputs
    config.py        SMoESConfig, the method's settings (pydantic)
    errors.py        the errors a user can fix

Imports torch, pydantic and this package only: never deepspeed, ray, mlflow or a layer above
(tests/test_layers.py keeps it so).
"""
