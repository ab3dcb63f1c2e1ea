"""Run under `deepspeed --num_gpus 2`: every gate trains a few steps with ep_size 2 on gloo.
Each rank writes OUT/rank{r}.json with per-gate losses and routing statistics."""
import math

from ckpt_roundtrip import build, synthetic_batch
from rank_report import parse_args, write_report

from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed
from ds_smoes.moe.collector import RoutingCollector

GATES = {
    "smoes": {}, "smoes-kl": {"gate": "smoes", "bin_objective": "kl"}, "topk": {"gate": "topk"},
    "hard": {"gate": "hard"}, "hybrid": {"gate": "hybrid", "num_experts": 6, "shared_experts": 2},
    "ltdr": {"gate": "ltdr", "ltdr_top_a": 3}, "smar": {"gate": "smar"},
    "smoes-rank-once": {"dispatch": "rank_once"},
}


def main() -> None:
    args = parse_args(("--steps", {"type": int, "default": 3}))
    init_distributed()
    rank = distributed.rank()
    report = {}
    for name, fields in GATES.items():
        engine = build(0, "hard", **fields)
        losses = []
        collector = RoutingCollector(engine.module.moe_layers())
        for step in range(args.steps):
            b = synthetic_batch(1000 * rank + step)
            with collector:
                out = engine(b.input_ids_BT, b.attention_mask_BT, b.modality_BT, b.image_BCHW, b.has_image_B,
                             b.labels_BT)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        last = collector.last()[0]
        stats, comm = last.stats, last.comm()
        report[name] = {"losses": losses, "finite": all(math.isfinite(l) for l in losses),
                        "gate_class": type(engine.module.moe_layers()[0].gate).__name__,
                        "num_tokens": int(stats.num_tokens), "routed": int(stats.load_ME.sum()),
                        "cross_rank_rate": float(stats.comm_binned["cross_rank_rate"]),
                        "losses_logged": sorted(stats.losses),
                        "dispatch": comm.dispatch, "remote_bytes": comm.remote_bytes}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
