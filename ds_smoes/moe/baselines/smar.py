"""`smar` (arXiv 2506.06406): symmetric KL between the two modalities' mean routing
distributions, penalised outside a band [kl_low, kl_high] (the SMoES paper's "inter-bin KL"
comparison), plus the GShard balance loss.  Routing: global softmax, global top-k."""
from __future__ import annotations

from ds_smoes.moe.gate import ModalityGate
from ds_smoes.core.losses import gshard_balance_loss, modality_kl_band_loss


class SMARGate(ModalityGate):
    def aux_losses(self, probs_SE, routes, inputs, valid_S):
        cfg = self.config
        l_bal = gshard_balance_loss(probs_SE, routes.selected_SE, valid_S)
        l_kl, kl = modality_kl_band_loss(probs_SE, inputs.labels_S, valid_S, cfg.kl_low, cfg.kl_high)
        return cfg.alpha_bal * l_bal + cfg.alpha_kl * l_kl, {"gshard_balance": l_bal, "kl_band": l_kl,
                                                              "modality_kl": kl}
