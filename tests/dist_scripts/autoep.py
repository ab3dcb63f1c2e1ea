"""Run under `deepspeed --num_gpus 2`: DeepSpeed's AutoEP (the `expert_parallel` config section) on a tiny random
Qwen3-MoE, 2 gloo ranks, autoep_size 2, the `qwen3_moe` preset: initialise and train three steps.  The transformers
version is the one the project pins; an upgrade that breaks AutoEP's initialisation (as 5.23 did, changing the
output-capture registry DeepSpeed 0.19.8 writes to) fails here.  Each rank writes OUT/rank{r}.json."""
import math

import deepspeed
import torch
import transformers
from rank_report import parse_args, write_report

from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed


def main() -> None:
    args = parse_args(("--steps", {"type": int, "default": 3}))
    init_distributed()
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                 "expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": "qwen3_moe"}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    losses = []
    for step in range(args.steps):
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))   # the same on both ranks
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
    layers = sorted({type(m).__name__ for m in engine.module.modules() if type(m).__name__.startswith("AutoEP")})
    write_report(args.out, {"rank": distributed.rank(), "transformers": transformers.__version__,
                            "deepspeed": deepspeed.__version__, "losses": losses,
                            "finite": all(math.isfinite(l) for l in losses), "layers": layers})


if __name__ == "__main__":
    main()
