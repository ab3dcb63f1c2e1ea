"""The gate variants of the comparisons and of the recipe's stage III: a name and its `--set` items on top of the
base config (whose own smoes section is "smoes").  One table for `python -m ds_smoes.compare` and
`python -m ds_smoes.pipeline --variant`."""
from __future__ import annotations

# name -> overrides on top of the base config (the base config's own smoes section is "smoes")
VARIANTS: dict[str, list[str]] = {
    "topk": ["smoes.gate=topk"],
    "hard": ["smoes.gate=hard"],
    "hybrid": ["smoes.gate=hybrid", "smoes.text_experts=1", "smoes.shared_experts=2"],
    "ltdr": ["smoes.gate=ltdr", "smoes.ltdr_top_a=4"],
    "smar": ["smoes.gate=smar"],
    "smoes": [],
    "smoes-gaussian": ["smoes.score_type=gaussian"],
    "smoes-binning-only": ["smoes.alpha_mi=0"],
    "smoes-one-bin": ["smoes.max_bins_per_token=1"],
    "smoes-fixed-bins": ["smoes.binning=fixed"],
    "smoes-hard-score": ["smoes.score_type=hard"],
    "smoes-kl": ["smoes.bin_objective=kl"],
}
