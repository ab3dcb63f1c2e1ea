"""Placements for serving engines: SGLang's `--init-expert-location` file, the EPLB maps, the measured expert
load by modality, and the serving-load simulation (docs/serving.md).

    python -m ds_smoes.export --run runs/demo --serving [--redundant-experts N] [--serving-ep-size R]

writes next to the export:

- `sglang_expert_location.json`: {"physical_to_logical_map": [layers][physical slots]}, the file SGLang's
  `--init-expert-location PATH` reads (its `init_by_mapping`; logical ids are the router's expert ids);
- `eplb_maps.json`: `phy2log` / `log2phy` / `logcnt` as DeepSeek's EPLB `rebalance_experts` returns them
  (vLLM's EplbState: physical_to_logical_map, logical_to_physical_map, logical_replica_count);
- `expert_load.json`: per MoE layer and modality, the routes each expert received (where they were measured);
- `serving_sim.json` / `serving_sim.md`: bins vs linear vs round-robin placement on image-heavy, mixed and
  text-heavy traces (app/serving_placement.py states the model).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ds_smoes.app.serving_placement import (PLACEMENTS, TRACES, PlacementError, ServingMaps, maps_from_eplb,
                                             maps_from_phy2log, plan_serving, simulate_serving, trace_routes)

SGLANG_FILE, EPLB_FILE, LOAD_FILE = "sglang_expert_location.json", "eplb_maps.json", "expert_load.json"
SIM_JSON, SIM_MD = "serving_sim.json", "serving_sim.md"
MODALITIES = ("text", "vision")


# -- the files ---------------------------------------------------------------------------------------
def sglang_location(maps: ServingMaps) -> dict:
    """SGLang reads a dict with `physical_to_logical_map` and calls `init_by_mapping(**dict)`: no other key
    may be present (a `logical_count` key would be an unexpected argument there)."""
    return {"physical_to_logical_map": maps.phy2log_LP.tolist()}


def eplb_record(maps: ServingMaps, placement: str) -> dict:
    return {"format": "ds-smoes-eplb/1", "placement": placement, "num_ranks": maps.num_ranks,
            "num_logical_experts": maps.num_experts, "num_physical_experts": maps.phy2log_LP.shape[1],
            "phy2log": maps.phy2log_LP.tolist(), "log2phy": maps.log2phy_LEQ.tolist(),
            "logcnt": maps.logcnt_LE.tolist()}


def read_sglang(path: Path, num_experts: int, num_ranks: int) -> ServingMaps:
    """Parse an SGLang expert-location JSON back into validated maps."""
    data = json.loads(Path(path).read_text())
    if set(data) != {"physical_to_logical_map"}:
        raise PlacementError(f"{path}: SGLang's init_by_mapping takes exactly the key physical_to_logical_map, "
                             f"found {sorted(data)}")
    return maps_from_phy2log(torch.tensor(data["physical_to_logical_map"]), num_experts, num_ranks)


def read_eplb(path: Path) -> ServingMaps:
    data = json.loads(Path(path).read_text())
    missing = {"phy2log", "log2phy", "logcnt", "num_ranks"} - set(data)
    if missing:
        raise PlacementError(f"{path}: missing keys {sorted(missing)}")
    return maps_from_eplb(data["phy2log"], data["log2phy"], data["logcnt"], data["num_ranks"])


def load_record(load_LME: torch.Tensor, source: str) -> dict:
    return {"source": source, "unit": "routes per expert (a token counts once for each of its k experts)",
            "modalities": list(MODALITIES),
            "layers": [{"moe_layer": l, **{m: load_LME[l, i].tolist() for i, m in enumerate(MODALITIES)}}
                       for l in range(load_LME.shape[0])]}


def read_load(path: Path) -> torch.Tensor:
    data = json.loads(Path(path).read_text())
    return torch.tensor([[layer[m] for m in MODALITIES] for layer in data["layers"]], dtype=torch.float64)


# -- the simulation ------------------------------------------------------------------------------------
def simulation_rows(plans: dict[str, ServingMaps], load_LME: torch.Tensor, k: int, hidden_size: int,
                    element_bytes: int, num_tokens: int, seed: int = 0) -> list[dict]:
    """One row per trace and placement; every placement of a trace sees the same sampled tokens."""
    rows = []
    for trace, vision_share in TRACES.items():
        routes = trace_routes(load_LME, k, num_tokens, vision_share, seed)
        for name, maps in plans.items():
            f = simulate_serving(maps, load_LME, k, hidden_size, element_bytes, vision_share, routes_LSK=routes)
            rows.append({"trace": trace, "vision_share": vision_share, "placement": name,
                         "max_over_mean_load": f.max_over_mean_load, "remote_ranks_per_token": f.remote_ranks_per_token,
                         "cross_rank_rate": f.cross_rank_rate, "remote_bytes_per_token": f.remote_bytes_per_token,
                         "max_over_mean_load_per_layer": list(f.max_over_mean_load_L),
                         "remote_bytes_per_token_per_layer": list(f.remote_bytes_per_token_L)})
    return rows


def simulation_table(rows: list[dict]) -> str:
    lines = ["| trace (vision share) | placement | max / mean rank load | remote ranks / token | cross-rank rate "
             "| remote bytes / token |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trace']} ({r['vision_share']:.0%}) | {r['placement']} | {r['max_over_mean_load']:.3f} "
                     f"| {r['remote_ranks_per_token']:.3f} | {r['cross_rank_rate']:.3f} "
                     f"| {r['remote_bytes_per_token']:.1f} |")
    return "\n".join(lines)


def plan_all(bin_LE, physical_LE, load_LME, num_bins: int, num_ranks: int, redundant_experts: int) -> dict:
    """The three placements, and each with replicas when asked: name -> maps."""
    plans = {}
    for kind in PLACEMENTS:
        plans[kind] = plan_serving(kind, bin_LE, physical_LE, load_LME, num_bins, num_ranks)
        if redundant_experts:
            plans[f"{kind}+{redundant_experts}"] = plan_serving(kind, bin_LE, physical_LE, load_LME, num_bins,
                                                                num_ranks, redundant_experts)
    return plans


def write_serving_files(out_dir: Path, bin_LE, physical_LE, load_LME, load_source: str, num_bins: int,
                        num_ranks: int, redundant_experts: int, k: int, hidden_size: int, element_bytes: int,
                        num_tokens: int = 20000, log=print) -> dict:
    """Plan, write, read back (the files must parse into the same placement) and simulate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_all(bin_LE, physical_LE, load_LME, num_bins, num_ranks, redundant_experts)
    served_name = f"bins+{redundant_experts}" if redundant_experts else "bins"
    served = plans[served_name]
    (out_dir / SGLANG_FILE).write_text(json.dumps(sglang_location(served)))
    (out_dir / EPLB_FILE).write_text(json.dumps(eplb_record(served, served_name)))
    (out_dir / LOAD_FILE).write_text(json.dumps(load_record(load_LME, load_source), indent=1))
    for parsed in (read_sglang(out_dir / SGLANG_FILE, served.num_experts, num_ranks), read_eplb(out_dir / EPLB_FILE)):
        if not all(torch.equal(getattr(parsed, f), getattr(served, f)) for f in ("phy2log_LP", "log2phy_LEQ", "logcnt_LE")):
            raise PlacementError("a serving file did not parse back into the placement written")   # a bug
    rows = simulation_rows(plans, load_LME, k, hidden_size, element_bytes, num_tokens)
    table = simulation_table(rows)
    note = (f"{num_ranks} EP ranks, {served.num_experts} experts, top-{k}, hidden {hidden_size}, {element_bytes}-byte "
            f"elements, {num_tokens} tokens per trace and MoE layer, load measured on {load_source}; figures "
            f"averaged over {load_LME.shape[0]} MoE layers (remote bytes: per token and MoE layer, rank_once, "
            "dispatch + combine)")
    (out_dir / SIM_JSON).write_text(json.dumps({"note": note, "rows": rows}, indent=1))
    (out_dir / SIM_MD).write_text(f"{note}\n\n{table}\n")
    log(f"serving: {SGLANG_FILE} and {EPLB_FILE} ({served_name} placement, {served.phy2log_LP.shape[1]} physical "
        f"slots on {num_ranks} ranks), {LOAD_FILE} ({load_source}), {SIM_MD}")
    log(note)
    log(table)
    return {"placement": served_name, "rows": rows}


# -- from a loaded model ---------------------------------------------------------------------------------
def measured_load(model, cfg, run_dir: Path, source: str, log=print) -> tuple[torch.Tensor, str]:
    """load_LME [layers, 2, experts]: `test` runs a teacher-forced pass over the test split (one process);
    `ema` reads the gates' training-time EMA of the per-step load (`binning.load_ema_ME`, beta ema_beta)."""
    layers = model.moe_layers()
    if source == "ema":
        return torch.stack([l.gate.binning.load_ema_ME.detach().double().cpu() for l in layers]), \
            f"the training-time EMA of the load (beta {cfg.smoes.ema_beta}) in the checkpoint"
    if source != "test":
        raise PlacementError(f"--serving-load {source!r}: one of test, ema")
    from ds_smoes.app.evaluation import measure_routing
    from ds_smoes.data import LlavaDataset, WordTokenizer, load_llava_json

    tokenizer = WordTokenizer.load(Path(run_dir) / "tokenizer.json")
    samples = load_llava_json(Path(cfg.data.test_json), Path(cfg.data.image_folder))
    m = cfg.model
    dataset = LlavaDataset(samples, tokenizer, m.image_size, m.patch_size, m.compress.pre_llm_budget(m.num_patches))
    log(f"serving: measuring the expert load on the test split ({len(dataset)} conversations) ...")
    device = next(model.parameters()).device
    routing = measure_routing(model, dataset, cfg.run.eval_batch_size, device)
    tokens = int(routing.load_LME[0].sum()) // cfg.smoes.k
    return routing.load_LME.double(), f"the test split ({len(dataset)} conversations, {tokens} tokens)"


def write_serving(model, cfg, run_dir: Path, out_dir: Path, num_ranks: int | None = None, redundant_experts: int = 0,
                  load_source: str = "test", num_tokens: int = 20000, log=print) -> dict:
    layers = model.moe_layers()
    if not layers:
        raise PlacementError("the model has no MoE layer: nothing to place")
    s = cfg.smoes
    num_ranks = num_ranks or s.ep_size
    load_LME, source = measured_load(model, cfg, run_dir, load_source, log)
    bin_LE = torch.stack([l.gate.binning.bin_E.cpu() for l in layers])
    physical_LE = torch.stack([l.gate.physical_E.cpu() for l in layers])
    # the bins placement keeps the export's slots when they already put every bin on its rank
    expert = next(layers[0].deepspeed_moe.experts.parameters())
    return write_serving_files(out_dir, bin_LE, physical_LE, load_LME, source, s.num_bins, num_ranks,
                               redundant_experts, s.k, layers[0].gate.wg.weight.shape[1], expert.element_size(),
                               num_tokens, log)
