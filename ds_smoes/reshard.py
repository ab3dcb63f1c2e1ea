"""Convert a training checkpoint to another expert-parallel degree, optimizer state included.

    python -m ds_smoes.reshard --checkpoint runs/demo/checkpoint --ep-size 1 --out runs/demo/checkpoint_ep1
    python -m ds_smoes.reshard --checkpoint runs/demo/checkpoint --ep-size 2 --placement identity --out NEW
    python -m ds_smoes.train --config configs/demo.yaml --set smoes.ep_size=1 --resume-from runs/demo/checkpoint_ep1

Reads every file of the checkpoint tag (saved at any ep_size: model states, expert files, one optimizer
file per EP rank), keys every expert's weights and Adam moments by its logical id, and writes the checkpoint
DeepSpeed would have saved at --ep-size with the experts at --placement:

    bins       every expert on its bin's EP rank (those already there keep their slot; default)
    keep       the saved physical ids
    identity   physical id = logical id
    FILE       JSON: one permutation (physical id of each logical expert) per MoE layer, or an
               export's placement.json

The parameter order of each rank's optimizer comes from the model, built from the run's
train_config.json (the folder above --checkpoint, or --config).  The training entry point does the
same conversion by itself when --resume-from names a checkpoint of another ep_size.  fp32 with ZeRO
stage 0 only (ds_configs/cpu_ep.json): ZeRO >= 1 and bf16/fp16 flat optimizer buffers are not converted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds_smoes.core.errors import ConfigError, SMoESError


def builtin_layout(config_path: Path, ep_size: int) -> list[list[str]]:
    """The optimizer layout (parameter names per group) of the built-in model of a run at `ep_size`."""
    import torch

    from ds_smoes.app.config import TrainConfig
    from ds_smoes.app.reshard import optimizer_layout
    from ds_smoes.app.session import optimizer_groups
    from ds_smoes.data import WordTokenizer
    from ds_smoes.model import TinyMoEVLM

    cfg = TrainConfig.model_validate_json(config_path.read_text())
    tok_path = config_path.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise ConfigError(f"{tok_path} not found: the run's tokenizer sets the vocabulary of the model")
    tokenizer = WordTokenizer.load(tok_path)
    smoes = cfg.smoes.model_copy(update={"ep_size": ep_size})
    model = TinyMoEVLM(cfg.model, tokenizer.vocab_size, tokenizer.image_id,
                       smoes if cfg.model.moe_layers != "none" else None)
    return optimizer_layout(model, torch.optim.AdamW(optimizer_groups(model, cfg.optim.weight_decay)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.reshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="DeepSpeed checkpoint folder (e.g. RUN/checkpoint)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the folder's 'latest')")
    p.add_argument("--ep-size", type=int, required=True, help="expert-parallel degree to write")
    p.add_argument("--placement", default="bins", help="bins (default), keep, identity or a JSON file")
    p.add_argument("--out", type=Path, required=True, help="folder of the new checkpoint (same tag)")
    p.add_argument("--config", type=Path, default=None,
                   help="the run's train_config.json (default: next to the checkpoint folder)")
    args = p.parse_args(argv)
    try:
        from ds_smoes.app import reshard

        config = args.config or args.checkpoint.parent / "train_config.json"
        if not config.is_file():
            raise ConfigError(f"{config} not found: --config names the run's train_config.json")
        if "hf" in json.loads(config.read_text()):
            raise ConfigError("a Hugging Face run: resume it with python -m ds_smoes.train --hf-model ... "
                              "--resume-from CHECKPOINT, which converts across ep_size itself")
        if args.ep_size < 1:
            raise ConfigError(f"--ep-size {args.ep_size}: must be >= 1")
        if args.out.resolve() == args.checkpoint.resolve():
            raise ConfigError("--out must be another folder than --checkpoint")
        tag = reshard.resolve_tag(args.checkpoint, args.tag)
        saved = reshard.saved_ep_size(args.checkpoint, tag)
        if saved == 0:
            raise ConfigError(f"{args.checkpoint / tag}: no expp_rank_*_optim_states.pt (a dense model, or ZeRO >= 1 "
                              "whose flat optimizer buffers are not converted)")
        placement = args.placement
        if placement not in ("bins", "keep", "identity"):
            placement = reshard.load_placement_file(Path(placement))
        folder, state, physical = reshard.reshard_checkpoint(
            args.checkpoint, tag, builtin_layout(config, saved), args.out, args.ep_size,
            builtin_layout(config, args.ep_size), placement)
        print(f"converted {args.checkpoint / tag} (ep_size {saved}) -> {folder} (ep_size {args.ep_size}); "
              f"step {state.meta.get('step')}, {len(state.optim)} parameters with optimizer state")
        for i, p_E in enumerate(physical):
            print(f"  MoE layer {i}: physical id of each logical expert {p_E.tolist()}")
    except SMoESError as err:
        from ds_smoes.parallel.console import report_error

        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
