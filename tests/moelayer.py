"""DeepSpeed's own MOELayer around a modality gate, for tests that pin the gate contract and the stock dispatch to it.

MOELayer calls `gate(x, used_token, True, use_tutel)` with no room for the modality inputs, which the layer
(`ds_smoes.moe.layer.SMoESMoE`) passes as an argument; `GateWithInputs` holds the inputs of the batch a test
runs.
"""
from torch import nn


class GateWithInputs(nn.Module):
    def __init__(self, gate) -> None:
        super().__init__()
        self.gate = gate
        self.inputs = None

    def forward(self, x, used_token, sparse_routes, use_tutel):
        return self.gate(x, used_token, sparse_routes, use_tutel, inputs=self.inputs)
