"""Placements for serving engines: SGLang's `--init-expert-location` file, the EPLB maps, the measured expert
load by modality, the placement search on measured routes and the serving-load simulation (docs/serving.md).

    python -m ds_smoes.export --run runs/demo --serving [--redundant-experts N] [--serving-ep-size R]
                              [--serving-placement search|bins|linear|round_robin|eplb] [--serving-trace T]

writes next to the export:

- `sglang_expert_location.json`: {"physical_to_logical_map": [layers][physical slots]}, the file SGLang's
  `--init-expert-location PATH` reads (its `init_by_mapping`; logical ids are the router's expert ids), for the
  trace `--serving-trace` names; `sglang_expert_location.TRACE.json` the placement for each trace;
- `eplb_maps.json`: `phy2log` / `log2phy` / `logcnt` as DeepSeek's EPLB `rebalance_experts` returns them
  (vLLM's EplbState: physical_to_logical_map, logical_to_physical_map, logical_replica_count);
- `expert_load.json`: per MoE layer and modality, the routes each expert received (where they were measured);
- `serving_sim.json` / `serving_sim.md`: bins, linear, round-robin, EPLB-style and the searched placements on
  image-heavy, mixed and text-heavy traces of the measured routes (app/serving_placement.py states the model,
  app/placement_search.py the search), which one was exported for each trace and whether it is the best there.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_smoes.app.placement_search import score, search_placement
from ds_smoes.app.serving_placement import (PLACEMENTS, TRACES, PlacementError, ServingMaps, figures_on_routes,
                                             maps_from_eplb, maps_from_phy2log, plan_serving, replay_routes,
                                             trace_routes)

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
@dataclass
class MeasuredRoutes:
    """Per MoE layer, every valid token of a measured pass: its k experts (router ids), its modality and the
    conversation it came from (the search plans on even conversations, the comparison replays odd ones)."""
    indices_LSK: list[torch.Tensor]
    labels_LS: list[torch.Tensor]
    conversation_LS: list[torch.Tensor]

    def half(self, parity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(indices, labels) per layer of the conversations whose index has this parity."""
        keep = [c % 2 == parity for c in self.conversation_LS]
        return [x[m] for x, m in zip(self.indices_LSK, keep)], [x[m] for x, m in zip(self.labels_LS, keep)]


def traces_of(routes: MeasuredRoutes | None, load_LME: torch.Tensor, k: int, num_tokens: int, parity: int,
              seed: int) -> dict[str, list[torch.Tensor]]:
    """trace name -> per layer indices_SK: measured tokens of one half replayed (`replay_routes`), or, with no
    per-token routes, routes drawn from the load (`trace_routes`)."""
    if routes is None:
        return {trace: trace_routes(load_LME, k, num_tokens, share, seed + parity) for trace, share in TRACES.items()}
    indices_LSK, labels_LS = routes.half(parity)
    out = {}
    for trace, share in TRACES.items():
        generator = torch.Generator().manual_seed(seed)
        out[trace] = [replay_routes(i_SK, l_S, share, num_tokens, generator) for i_SK, l_S in zip(indices_LSK, labels_LS)]
    return out


def simulation_rows(plans: dict[str, ServingMaps], traces: dict[str, list[torch.Tensor]], hidden_size: int,
                    element_bytes: int) -> list[dict]:
    """One row per trace and placement; every placement of a trace sees the same tokens."""
    rows = []
    for trace, routes in traces.items():
        for name, maps in plans.items():
            f = figures_on_routes(maps, routes, hidden_size, element_bytes)
            rows.append({"trace": trace, "vision_share": TRACES[trace], "placement": name,
                         "max_over_mean_load": f.max_over_mean_load, "remote_ranks_per_token": f.remote_ranks_per_token,
                         "cross_rank_rate": f.cross_rank_rate, "remote_bytes_per_token": f.remote_bytes_per_token,
                         "max_over_mean_load_per_layer": list(f.max_over_mean_load_L),
                         "remote_bytes_per_token_per_layer": list(f.remote_bytes_per_token_L)})
    return rows


def best_per_trace(rows: list[dict], max_load: float) -> dict[str, list[str]]:
    """trace -> the placements with the fewest remote bytes per token among those whose max / mean rank load
    is within `max_load` in every MoE layer (all placements where none is; ties within 1e-9 relative)."""
    out = {}
    for trace in dict.fromkeys(r["trace"] for r in rows):
        mine = [r for r in rows if r["trace"] == trace]
        within = [r for r in mine if max(r["max_over_mean_load_per_layer"]) <= max_load + 1e-12] or mine
        least = min(r["remote_bytes_per_token"] for r in within)
        out[trace] = [r["placement"] for r in within if r["remote_bytes_per_token"] <= least * (1 + 1e-9)]
    return out


def simulation_table(rows: list[dict], best: dict[str, list[str]] | None = None) -> str:
    lines = ["| trace (vision share) | placement | max / mean rank load (worst layer) | remote ranks / token "
             "| cross-rank rate | remote bytes / token |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **best**" if best and r["placement"] in best.get(r["trace"], ()) else ""
        lines.append(f"| {r['trace']} ({r['vision_share']:.0%}) | {r['placement']}{mark} "
                     f"| {r['max_over_mean_load']:.3f} ({max(r['max_over_mean_load_per_layer']):.3f}) "
                     f"| {r['remote_ranks_per_token']:.3f} | {r['cross_rank_rate']:.3f} "
                     f"| {r['remote_bytes_per_token']:.1f} |")
    return "\n".join(lines)


def plan_all(bin_LE, physical_LE, load_LME, num_bins: int, num_ranks: int, redundant_experts: int,
             log=print) -> dict:
    """The base placements, and each with replicas when asked: name -> maps (eplb plans its own replicas; the
    bins placement is left out, with a line saying why, where the ranks do not divide the bins)."""
    plans = {}
    for kind in PLACEMENTS:
        if kind == "bins" and num_bins % num_ranks:
            log(f"serving: no bins placement: {num_bins} bins cannot be placed whole on {num_ranks} ranks")
            continue
        if kind != "eplb" or not redundant_experts:
            plans[kind] = plan_serving(kind, bin_LE, physical_LE, load_LME, num_bins, num_ranks)
        if redundant_experts:
            plans[f"{kind}+{redundant_experts}"] = plan_serving(kind, bin_LE, physical_LE, load_LME, num_bins,
                                                                num_ranks, redundant_experts)
    return plans


def searched_plan(plans: dict[str, ServingMaps], traces_L: list[torch.Tensor], num_ranks: int, max_load: float,
                  max_evals: int, log=print, label: str = "") -> ServingMaps:
    """Per MoE layer, `placement_search.search_placement` on the layer's trace from the bins placement (with the
    replicas asked for) and from the base placement that scores best on it; the better result."""
    slots = max(maps.phy2log_LP.shape[1] for maps in plans.values())
    full = {name: maps for name, maps in plans.items() if maps.phy2log_LP.shape[1] == slots}
    num_layers, num_experts = next(iter(full.values())).logcnt_LE.shape
    rows = []
    for l in range(num_layers):
        scored = {name: score(maps.phy2log_LP[l], [traces_L[l]], num_experts, num_ranks, max_load)
                  for name, maps in full.items()}
        best_base = min(scored, key=lambda n: (scored[n].excess, scored[n].remote, n))
        starts = list(dict.fromkeys([n for n in full if n.split("+")[0] == "bins"] + [best_base]))
        found = []
        for name in starts:
            phy2log_P, s, evals = search_placement(full[name].phy2log_LP[l], [traces_L[l]], num_experts, num_ranks,
                                                   max_load, max_evals)
            log(f"serving: search{label}, MoE layer {l}, from {name}: remote ranks/token {scored[name].remote:.4f} "
                f"-> {s.remote:.4f}, max/mean load {max(scored[name].loads):.3f} -> {max(s.loads):.3f} "
                f"({evals} placements scored)")
            found.append((s.excess, s.remote, len(found), phy2log_P))
        rows.append(min(found)[3])
    return maps_from_phy2log(torch.stack(rows), num_experts, num_ranks)


def location_file(trace: str) -> str:
    """The SGLang file of the placement exported for one trace (SGLANG_FILE holds the one for --serving-trace)."""
    return SGLANG_FILE.replace(".json", f".{trace}.json")


def write_serving_files(out_dir: Path, bin_LE, physical_LE, load_LME, load_source: str, num_bins: int,
                        num_ranks: int, redundant_experts: int, k: int, hidden_size: int, element_bytes: int,
                        num_tokens: int = 20000, routes: MeasuredRoutes | None = None, max_load: float = 1.1,
                        search_tokens: int = 4000, search_evals: int = 3000, placement: str = "search",
                        serving_trace: str = "mixed", log=print) -> dict:
    """Plan, search (one placement per trace), write, read back (the files must parse into the same placements)
    and simulate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if max_load < 1.0:
        raise PlacementError(f"--max-load-imbalance {max_load}: the max / mean rank load is at least 1.0")
    if serving_trace not in TRACES:
        raise PlacementError(f"--serving-trace {serving_trace!r}: one of {list(TRACES)}")
    plans = plan_all(bin_LE, physical_LE, load_LME, num_bins, num_ranks, redundant_experts, log)
    suffix = f"+{redundant_experts}" if redundant_experts else ""
    base = f"{placement}{suffix}" if f"{placement}{suffix}" in plans else placement
    if placement != "search" and base not in plans:
        raise PlacementError(f"--serving-placement {placement!r}: one of {sorted({n.split('+')[0] for n in plans})}")
    t0 = time.perf_counter()
    search_traces = traces_of(routes, load_LME, k, search_tokens, 0, seed=1)
    bases = dict(plans)
    exported = {}
    for trace in TRACES:
        if placement == "search":
            exported[trace] = f"search({trace}){suffix}"
            plans[exported[trace]] = searched_plan(bases, search_traces[trace], num_ranks, max_load,
                                                   search_evals, log, f" for {trace}")
        else:
            exported[trace] = base
    search_s = time.perf_counter() - t0
    for trace, name in exported.items():
        (out_dir / location_file(trace)).write_text(json.dumps(sglang_location(plans[name])))
    served_name = exported[serving_trace]
    served = plans[served_name]
    (out_dir / SGLANG_FILE).write_text(json.dumps(sglang_location(served)))
    (out_dir / EPLB_FILE).write_text(json.dumps(eplb_record(served, served_name)))
    (out_dir / LOAD_FILE).write_text(json.dumps(load_record(load_LME, load_source), indent=1))
    for parsed in (read_sglang(out_dir / SGLANG_FILE, served.num_experts, num_ranks), read_eplb(out_dir / EPLB_FILE)):
        if not all(torch.equal(getattr(parsed, f), getattr(served, f)) for f in ("phy2log_LP", "log2phy_LEQ", "logcnt_LE")):
            raise PlacementError("a serving file did not parse back into the placement written")   # a bug
    rows = simulation_rows(plans, traces_of(routes, load_LME, k, num_tokens, 1, seed=0), hidden_size, element_bytes)
    best = best_per_trace(rows, max_load)
    exported_is_best = {trace: exported[trace] in best[trace] for trace in TRACES}
    table = simulation_table(rows, best)
    how = ("replayed from the measured routes: the search plans on the even-numbered conversations, the comparison "
           "replays the odd-numbered ones" if routes is not None else
           "drawn from the measured load (no per-token routes were measured: each token's experts are drawn "
           "independently of each other, so co-activation is not modelled)")
    note = (f"{num_ranks} EP ranks, {served.num_experts} experts, top-{k}, hidden {hidden_size}, {element_bytes}-byte "
            f"elements, {num_tokens} tokens per trace and MoE layer, load measured on {load_source}; routes {how}; "
            f"figures averaged over {load_LME.shape[0]} MoE layers (remote bytes: per token and MoE layer, "
            f"rank_once, dispatch + combine); best: the fewest remote bytes among placements whose max / mean rank "
            f"load is within {max_load} in every layer; the search took {search_s:.1f} s")
    verdict = "; ".join(f"{trace}: {location_file(trace)} = {exported[trace]}, "
                        + ("the best" if exported_is_best[trace] else f"NOT the best (best: {', '.join(best[trace])})")
                        for trace in TRACES)
    verdict = f"exported ({SGLANG_FILE} = the {serving_trace} one): {verdict}"
    (out_dir / SIM_JSON).write_text(json.dumps({"note": note, "exported": exported, "serving_trace": serving_trace,
                                                "max_load": max_load, "best": best,
                                                "exported_is_best": exported_is_best, "rows": rows}, indent=1))
    (out_dir / SIM_MD).write_text(f"{note}\n\n{verdict}\n\n{table}\n")
    log(f"serving: {SGLANG_FILE} and {EPLB_FILE} ({served_name} placement, {served.phy2log_LP.shape[1]} physical "
        f"slots on {num_ranks} ranks), one {location_file('TRACE')} per trace, {LOAD_FILE} ({load_source}), {SIM_MD}")
    log(note)
    log(verdict)
    log(table)
    return {"placement": served_name, "exported": exported, "rows": rows, "best": best,
            "exported_is_best": exported_is_best}


# -- from a loaded model ---------------------------------------------------------------------------------
class RouteLog:
    """`measure_routing`'s `on_routes`: keeps, per MoE layer, each valid token's k experts (router ids, as
    selected before any capacity limit), its modality and its conversation's index in the dataset."""

    def __init__(self, num_layers: int, k: int) -> None:
        self.k = k
        self.parts = [([], [], []) for _ in range(num_layers)]

    def __call__(self, calls_L, rows: list[int]) -> None:
        row_B = torch.tensor(rows)
        for l, calls in enumerate(calls_L):
            for call in calls:
                routed = call.routed
                valid_S = routed.valid_S.detach().cpu()   # host read: the export's measuring pass, once
                selected_SE = routed.routes.selected_SE.detach().cpu()[valid_S]
                if selected_SE.numel() and not bool((selected_SE.sum(1) == self.k).all()):
                    raise PlacementError(f"MoE layer {l}: a token selected other than k={self.k} experts: its "
                                         "routes cannot be replayed")
                indices_SK = selected_SE.int().topk(self.k, dim=1).indices.sort(1).values
                inputs = routed.inputs
                self.parts[l][0].append(indices_SK)
                self.parts[l][1].append(inputs.labels_S.detach().cpu().long()[valid_S])
                self.parts[l][2].append(row_B[inputs.sample_id_S.detach().cpu().long()[valid_S]])
                call.routed = None

    def routes(self) -> MeasuredRoutes:
        return MeasuredRoutes(*([torch.cat(part[i]) for part in self.parts] for i in range(3)))


def measured_routing(model, cfg, run_dir: Path, source: str, log=print) -> tuple[torch.Tensor, str,
                                                                                MeasuredRoutes | None]:
    """(load_LME [layers, 2, experts], where it was measured, per-token routes or None).  `test` runs a
    teacher-forced pass over the test split (one process) and keeps every token's routes; `ema` reads the
    gates' training-time EMA of the per-step load (`binning.load_ema_ME`, beta ema_beta): no routes."""
    layers = model.moe_layers()
    if source == "ema":
        return torch.stack([l.gate.binning.load_ema_ME.detach().double().cpu() for l in layers]), \
            f"the training-time EMA of the load (beta {cfg.smoes.ema_beta}) in the checkpoint", None
    if source != "test":
        raise PlacementError(f"--serving-load {source!r}: one of test, ema")
    from ds_smoes.app.evaluation import measure_routing
    from ds_smoes.data import LlavaDataset, WordTokenizer, load_llava_json

    tokenizer = WordTokenizer.load(Path(run_dir) / "tokenizer.json")
    samples = load_llava_json(Path(cfg.data.test_json), Path(cfg.data.image_folder))
    m = cfg.model
    dataset = LlavaDataset(samples, tokenizer, m.image_size, m.patch_size, m.compress.pre_llm_budget(m.num_patches))
    log(f"serving: measuring the expert load and every token's routes on the test split ({len(dataset)} "
        "conversations) ...")
    device = next(model.parameters()).device
    route_log = RouteLog(len(layers), cfg.smoes.k)
    routing = measure_routing(model, dataset, cfg.run.eval_batch_size, device, on_routes=route_log)
    tokens = int(routing.load_LME[0].sum()) // cfg.smoes.k
    return (routing.load_LME.double(), f"the test split ({len(dataset)} conversations, {tokens} tokens)",
            route_log.routes())


def write_serving(model, cfg, run_dir: Path, out_dir: Path, num_ranks: int | None = None, redundant_experts: int = 0,
                  load_source: str = "test", num_tokens: int = 20000, max_load: float = 1.1,
                  placement: str = "search", search_evals: int = 3000, serving_trace: str = "mixed",
                  log=print) -> dict:
    layers = model.moe_layers()
    if not layers:
        raise PlacementError("the model has no MoE layer: nothing to place")
    s = cfg.smoes
    num_ranks = num_ranks or s.ep_size
    load_LME, source, routes = measured_routing(model, cfg, run_dir, load_source, log)
    bin_LE = torch.stack([l.gate.binning.bin_E.cpu() for l in layers])
    physical_LE = torch.stack([l.gate.physical_E.cpu() for l in layers])
    # the bins placement keeps the export's slots when they already put every bin on its rank
    expert = next(layers[0].deepspeed_moe.experts.parameters())
    return write_serving_files(out_dir, bin_LE, physical_LE, load_LME, source, s.num_bins, num_ranks,
                               redundant_experts, s.k, layers[0].gate.wg.weight.shape[1], expert.element_size(),
                               num_tokens, routes=routes, max_load=max_load, search_evals=search_evals,
                               placement=placement, serving_trace=serving_trace, log=log)
