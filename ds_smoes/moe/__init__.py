"""The DeepSpeed integration: the gates and the MoE layer.

    gate.py       ModalityGate (a DeepSpeed TopKGate with modality side-information) and SMoESGate: the router,
                  whose calls return what they computed (Routed, the losses, RoutingStats)
    layer.py      SMoESMoE: DeepSpeed's MoE with the gate, the scores, its dispatcher and placement
    autoep.py     SMoESAutoEPLayer: DeepSpeed AutoEP's layer adopted with a gate, its two dispatchers, placement
    modality.py   the soft modality scores both layers hand their gate
    bin_placement.py  BinPlacement: both layers' experts onto their bins' EP ranks once the bins freeze
    dispatchers.py  the stock and rank_once dispatchers (config.dispatch -> one component per layer)
    collector.py  RoutingCollector: a caller's scope that receives each MoE call's statistics and bytes
    registry.py   smoes.gate -> gate class
    baselines/    DeepSpeed top-k, hard modality routing, LTDR, the KL band (docs/gates.md)

Imports `ds_smoes.core`, `ds_smoes.parallel` and DeepSpeed.
"""
