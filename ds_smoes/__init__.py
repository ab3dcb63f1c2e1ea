"""ds_smoes: SMoES (Soft Modality-guided Expert Specialization) for DeepSpeed-MoE.

The method core (scores, binning, losses, routing, metrics) imports nothing from Ray or
MLflow; `gate` and `layer` are the DeepSpeed integration; `tracking` is the MLflow layer.
"""
__version__ = "0.1.0"
