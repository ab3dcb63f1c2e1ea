"""The SMoES gate's two auxiliary losses as single autograd nodes with analytic backwards.

Same values and gradients as the reference forms in `ds_smoes.core.losses` (`mutual_information_loss`,
`bin_balance_loss`; tests/test_fused_losses.py checks both on hand-made and random routings), which
stay the readable statement of the math.  Why a second form: on a small MoE layer the references
cost about as much as the rest of the gate, because autograd records ~60 tiny ops per call and
replays them backwards.  Here each loss is one `torch.autograd.Function`: the forward runs without
recording, and the backward is a few matrix products.  Gathers along a dimension use `index_select`:
advanced indexing costs more on CPU (both losses together: 568 vs 620 us per call, fwd+bwd, 640 tokens,
4 experts, 1 thread).  Building a dense [tokens, samples x modalities] matrix to turn the per-sample
scatter and gather into matrix products was slower still (+38 us) and is not used.

Shapes (glossary: `ds_smoes/__init__.py`): S tokens, E experts, G bins, M = 2 modalities, N samples,
Q = N * M (sample, modality) rows, X fields of a packed row.

Mutual information.  With the token-to-row matrix A[s, (n, m)] = [sample(s) = n] * w[s, m] (w: the modality score of a
valid token, 0 for padding) the per-sample table of `losses.modality_bin_table` is
    num_QG = A^T @ probs_SE @ onehot_EG,   den_Q = sum_s A[s, q],   s_QG = num_QG / (E/G * den_Q),
and, per sample n with T_n = sum_{m,b} s[n,m,b],
    I_n = sum_{m,b} p log(p / (p_m p_b)),   p = s / T_n,
    dI_n / ds[n,m,b] = (log(p[m,b] / (p_m p_b)) - I_n) / T_n.
The loss is -mean I_n over samples holding a valid token, so
    dL/dprobs_SE = A @ (g_QG @ onehot_EG^T),   g_QG = -dI/ds * present_Q / (E/G * den_Q) / #samples.
A table entry that is 0 (a modality absent from the sample) gets no gradient, as in the reference.

Bin balance.  q[s,e] = probs[s,e] / Z[s, bin(e)] with Z[s,b] = sum_{e in b} probs[s,e];
P_e = mean over the V valid tokens of q[s,e]; L = E/G * sum_e f_e P_e (f: detached load shares), so
    dL/dprobs[s,j] = E/G / V * valid_s / Z[s, bin(j)] * (f_j - sum_{e in bin(j)} f_e q[s,e]).
"""
from __future__ import annotations

import torch

from ds_smoes.core.binning import bin_one_hot
from ds_smoes.core.losses import resolve_num_bins, sample_id_error

_TINY = 1e-30


def _per_sample_sums(num_samples: int, sample_id_S: torch.Tensor, mass_SX: torch.Tensor) -> torch.Tensor:
    """sums_NX: rows of `mass_SX` summed per sample id.  An id outside [0, num_samples) is refused with
    `sample_id_error`'s message where the device reports it as an error (the CPU; CUDA raises a device-side
    assert instead: `smoes.validate_inputs` checks ids before they get here)."""
    try:
        return mass_SX.new_zeros(num_samples, mass_SX.shape[1]).index_add_(0, sample_id_S, mass_SX)
    except (IndexError, RuntimeError) as err:
        if sample_id_S.device.type == "cpu":
            raise sample_id_error(int(sample_id_S.max()), sample_id_S.numel()) from err
        raise


class _MutualInformationLoss(torch.autograd.Function):
    """-mean_n I_n from probs_SE (see the module docstring)."""

    @staticmethod
    def forward(ctx, probs_SE, weight_SM, sample_id_S, onehot_EG, bin_idx_E, num_samples: int, experts_per_bin: int):
        num_tokens, num_modalities = weight_SM.shape
        num_bins = onehot_EG.shape[1]
        probs_SG = probs_SE @ onehot_EG
        # per sample, in one scatter: the table's numerators (M * B columns), then its denominators (M columns)
        mass_SX = torch.cat([(weight_SM.unsqueeze(-1) * probs_SG.unsqueeze(1)).reshape(num_tokens, -1), weight_SM], 1)
        sums_NX = _per_sample_sums(num_samples, sample_id_S, mass_SX)
        num_NMG, den_NM = sums_NX[:, :num_modalities * num_bins], sums_NX[:, num_modalities * num_bins:]
        scale_NM = torch.where(den_NM > 0, 1.0 / (experts_per_bin * den_NM.clamp_min(_TINY)), 0.0)
        s_NMG = num_NMG.view(num_samples, num_modalities, num_bins) * scale_NM.unsqueeze(-1)
        total_N = s_NMG.sum((1, 2))
        has_N = total_N > 0
        num_has = has_N.sum().clamp_min(1)   # a tensor: dividing by it needs no host read
        p_NMG = s_NMG / total_N.clamp_min(_TINY)[:, None, None]
        log_ratio = (p_NMG.clamp_min(_TINY).log() - p_NMG.sum(2, keepdim=True).clamp_min(_TINY).log()
                     - p_NMG.sum(1, keepdim=True).clamp_min(_TINY).log())
        positive_NMG = p_NMG > 0
        mi_N = (p_NMG * log_ratio * positive_NMG).sum((1, 2))
        ctx.save_for_backward(weight_SM, sample_id_S, bin_idx_E, scale_NM, log_ratio, mi_N, total_N, positive_NMG,
                              has_N, num_has)
        return -(mi_N * has_N).sum() / num_has

    @staticmethod
    def backward(ctx, grad_loss):
        (weight_SM, sample_id_S, bin_idx_E, scale_NM, log_ratio, mi_N, total_N, positive_NMG, has_N,
         num_has) = ctx.saved_tensors
        # samples without mass (has_N False, every row when none has any) get coefficient 0: zero gradient
        coef_N = has_N / total_N.clamp_min(_TINY) * (-grad_loss / num_has)
        g_NMG = (log_ratio - mi_N[:, None, None]) * positive_NMG * (coef_N[:, None, None] * scale_NM.unsqueeze(-1))
        grad_SG = (g_NMG.index_select(0, sample_id_S) * weight_SM.unsqueeze(-1)).sum(1)
        grad_SE = grad_SG.index_select(1, bin_idx_E)
        return grad_SE, None, None, None, None, None, None


class _BinBalanceLoss(torch.autograd.Function):
    """E/G * sum_e f_e P_e from probs_SE (see the module docstring)."""

    @staticmethod
    def forward(ctx, probs_SE, f_E, valid_S, onehot_EG, bin_idx_E, experts_per_bin: int):
        z_SE = (probs_SE @ onehot_EG).index_select(1, bin_idx_E).clamp_min(_TINY)
        q_SE = probs_SE / z_SE
        num_valid = valid_S.sum()
        p_E = (valid_S @ q_SE) / num_valid.clamp_min(1.0)
        ctx.save_for_backward(f_E, valid_S, onehot_EG, bin_idx_E, z_SE, q_SE, num_valid)
        ctx.experts_per_bin = experts_per_bin
        return experts_per_bin * (f_E * p_E).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        f_E, valid_S, onehot_EG, bin_idx_E, z_SE, q_SE, num_valid = ctx.saved_tensors
        inside_SE = ((q_SE * f_E) @ onehot_EG).index_select(1, bin_idx_E)
        coef_S = valid_S * (grad_loss * ctx.experts_per_bin / num_valid.clamp_min(1.0))
        return (f_E - inside_SE) / z_SE * coef_S.unsqueeze(1), None, None, None, None, None


def mutual_information_loss(probs_SE: torch.Tensor, modality_SM: torch.Tensor, bin_E: torch.Tensor,
                            sample_id_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                            num_bins: int | None = None) -> torch.Tensor:
    """`ds_smoes.core.losses.mutual_information_loss`, one autograd node."""
    num_bins = resolve_num_bins(bin_E, num_bins)
    # rows of the per-sample table: one per token bounds the samples without reading the largest id back to the
    # host; rows of absent samples stay empty and count for nothing
    num_samples = sample_id_S.numel()
    if num_samples == 0:
        return probs_SE.sum() * 0.0
    weight_SM = modality_SM.to(probs_SE.dtype)
    if valid_S is not None:
        weight_SM = weight_SM * valid_S.to(probs_SE.dtype).unsqueeze(-1)
    onehot_EG = bin_one_hot(bin_E, num_bins).to(probs_SE)
    return _MutualInformationLoss.apply(probs_SE, weight_SM, sample_id_S.long(), onehot_EG, bin_E.long(),
                                        num_samples, probs_SE.shape[1] // num_bins)


def bin_balance_loss(probs_SE: torch.Tensor, selected_SE: torch.Tensor, bin_E: torch.Tensor,
                     valid_S: torch.Tensor | None = None, num_bins: int | None = None) -> torch.Tensor:
    """`ds_smoes.core.losses.bin_balance_loss`, one autograd node."""
    num_bins = resolve_num_bins(bin_E, num_bins)
    valid_f_S = (torch.ones(probs_SE.shape[0], dtype=probs_SE.dtype, device=probs_SE.device) if valid_S is None
                 else valid_S.to(probs_SE.dtype))
    onehot_EG = bin_one_hot(bin_E, num_bins).to(probs_SE)
    bin_idx_E = bin_E.long()
    count_E = valid_f_S @ selected_SE.to(probs_SE.dtype)
    f_E = count_E / (count_E @ onehot_EG).index_select(0, bin_idx_E).clamp_min(1.0)
    return _BinBalanceLoss.apply(probs_SE, f_E, valid_f_S, onehot_EG, bin_idx_E, probs_SE.shape[1] // num_bins)
