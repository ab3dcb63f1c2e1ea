"""Figures: the per-layer expert-by-modality load heatmap."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ds_smoes.core.metrics import modality_specialization_index  # noqa: E402


def expert_modality_heatmap(load_LME: torch.Tensor, bin_LE: torch.Tensor | None = None, title: str = ""):
    """One row per MoE layer: each modality's tokens spread over the experts (rows sum to 1),
    annotated with the layer's MSI and, when given, each expert's bin."""
    num_layers, _, num_experts = load_LME.shape
    fig, axes = plt.subplots(num_layers, 1, figsize=(max(4.0, 0.6 * num_experts + 2), 1.4 * num_layers + 0.8),
                             squeeze=False)
    for l in range(num_layers):
        ax = axes[l, 0]
        share_ME = load_LME[l] / load_LME[l].sum(-1, keepdim=True).clamp_min(1e-12)
        im = ax.imshow(share_ME.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
        msi = float(modality_specialization_index(load_LME[l, 0:1], load_LME[l, 1:2]))
        ax.set_yticks([0, 1], ["text", "vision"])
        labels = [f"e{e}" + (f"\nb{int(bin_LE[l, e])}" if bin_LE is not None else "") for e in range(num_experts)]
        ax.set_xticks(range(num_experts), labels, fontsize=7)
        ax.set_title(f"MoE layer {l}: share of each modality's routed tokens per expert (MSI {msi:.2f})",
                     fontsize=8)
        top = float(share_ME.max())
        for m in range(2):
            for e in range(num_experts):
                value = float(share_ME[m, e])
                ax.text(e, m, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 * top else "white")
        fig.colorbar(im, ax=ax, fraction=0.02)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
