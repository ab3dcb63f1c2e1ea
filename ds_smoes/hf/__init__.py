"""Bring your own MoE-VLM: Hugging Face transformers models converted to SMoES (docs/hf.md).

    from ds_smoes.hf import convert_to_smoes, upcycle_to_smoes, export_pretrained
    model = convert_to_smoes(hf_model, SMoESConfig(num_bins=2, score_type="attention"))  # MoE-VLM
    model = upcycle_to_smoes(dense_vlm, SMoESConfig(num_experts=4, k=2))                # dense VLM
    ... train (python -m ds_smoes.train --hf-model PATH) ...
    export_pretrained(model, "out/")   # back to the transformers architecture (save_pretrained)

Or through DeepSpeed's AutoEP (`hf.backend: autoep`): `ds_smoes.hf.autoep.prepare_autoep`, `autoep_section`,
`adopt_autoep` (docs/hf.md).

Importing this package registers the architecture adapters (ds_smoes.hf.adapters).
"""
from ds_smoes.hf import adapters  # noqa: F401  (registers the adapters)
from ds_smoes.hf.convert import convert_to_smoes, smoes_config_for
from ds_smoes.hf.export import export_pretrained, export_state_dict
from ds_smoes.hf.model import SMoESHFModel, SMoESOutput
from ds_smoes.hf.upcycle import upcycle_to_smoes

__all__ = ["SMoESHFModel", "SMoESOutput", "convert_to_smoes", "export_pretrained", "export_state_dict",
           "smoes_config_for", "upcycle_to_smoes"]
