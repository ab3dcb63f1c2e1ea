"""Checkpoints across ep_size: read a DeepSpeed training checkpoint written at one expert-parallel
degree, write one that `engine.load_checkpoint` loads at another (optimizer state included).

    state = read_logical(ckpt_dir, tag, layout_at_source)       # every rank's files -> one logical state
    write_checkpoint(state, out_dir, tag, ep_size, layout_at_target, placement)

What DeepSpeed writes (fp32, ZeRO stage 0, MoE; deepspeed/runtime/engine.py `_save_moe_checkpoint`):

- `TAG/mp_rank_00_model_states.pt`: the non-expert module state ("module": router rows, the gates'
  buffers, among them `physical_E`, the SMoES bins and statistics), the lr scheduler, DeepSpeed's
  counters and the caller's client state (step, epoch), written once (data-parallel rank 0);
- `TAG/layer_{l}_expert_{p}_mp_rank_00_model_states.pt`: MoE layer l's expert at **physical** (global)
  id p = r * n + j, local expert j of EP rank r, keys `...deepspeed_experts.{p}.*`;
- `TAG/expp_rank_{r}_mp_rank_00_optim_states.pt`: {"optimizer": EP rank r's torch optimizer
  `state_dict()`}.  torch numbers the parameters 0, 1, ... in the order of the optimizer's param groups
  (`state` maps that number to {"step", "exp_avg", "exp_avg_sq"}, `param_groups[g]["params"]` lists the
  numbers of group g); `split_params_into_different_moe_groups_for_optimizer` puts the non-expert
  parameters first (one group per original group) and then one group per original group and expert
  group name ("ep_size_R", `moe: True`) holding this rank's local experts in module order.

So the numbers mean nothing without the parameter order of each rank's optimizer: a **layout**,
the names of the parameters of each param group in order, as `named_parameters` names them on an EP
rank (local expert ids).  `optimizer_layout` reads it off a live model and optimizer;
`rescale_layout` derives the layout at another ep_size from it (only the number of local experts per
MoE layer changes; the run of a layer's experts inside a group is rewritten and checked).

The **logical state** keys every expert by its logical (router) id e, found through the gate's
`physical_E` buffer (`physical_E[e]` = the physical slot holding e's weights), so the placement is a
property of a written checkpoint, not of the state: `write_checkpoint` takes the target placement and
writes `physical_E'` into the gates.  Migration (`ds_smoes.parallel.migration`) and the deployment
export (`ds_smoes.app.export`) read `physical_E` as before.

Only fp32 with ZeRO stage 0 is converted (the project's default ds_configs/cpu_ep.json): ZeRO >= 1 and
bf16/fp16 keep the optimizer state in DeepSpeed's flat buffers, which this module does not re-cut.
Shapes: E experts (logical ids), P physical slots, R EP ranks; n = E / R experts per rank.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_smoes.core.errors import ConfigError

_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
_OPTIM_FILE = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_FILE = "mp_rank_00_model_states.pt"

Layout = list[list[str]]  # per optimizer param group: parameter names (local expert ids) in order


@dataclass
class LogicalState:
    """A training checkpoint with every expert keyed by its logical id (`...deepspeed_experts.{e}.*`).

    module: non-expert module state (gates' physical_E included: the placement it was saved with);
    experts: per MoE layer, {logical-id key: weight}; optim: {parameter name (logical for experts):
    torch optimizer state (step, exp_avg, exp_avg_sq)}; groups: the optimizer's param groups without
    their "params" (hyperparameters, in order); meta: everything else of the model-state file (lr
    scheduler, DeepSpeed counters, client state such as step and epoch); ep_size: saved at."""
    module: dict
    experts: list[dict]
    optim: dict
    groups: list[dict]
    meta: dict
    ep_size: int
    expert_prefixes: list[str] = field(default_factory=list)  # per MoE layer: "...deepspeed_experts."


# -- layouts ------------------------------------------------------------------------------------------
def optimizer_layout(model: torch.nn.Module, optimizer) -> Layout:
    """The names of a live torch optimizer's parameters, group by group (this rank's local expert ids)."""
    inner = optimizer if isinstance(optimizer, torch.optim.Optimizer) else getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ConfigError(f"{type(optimizer).__name__} keeps its state in flat buffers (DeepSpeed ZeRO >= 1 or "
                          "bf16/fp16): checkpoints across ep_size are converted for fp32 with ZeRO stage 0 only")
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in inner.param_groups]


def rescale_layout(layout: Layout, num_local_from: int | dict, num_local_to: int | dict) -> Layout:
    """The layout of the same model with another number of local experts per MoE layer.

    Inside a group, a layer's experts form one run `P.0.s1, P.0.s2, ..., P.1.s1, ...` (module order);
    the run is checked to hold num_local_from experts with the same suffixes and rewritten for
    num_local_to.  num_local_*: one int for every layer, or {expert prefix: int}."""
    def n_of(spec, prefix):
        return spec if isinstance(spec, int) else spec[prefix]

    out: Layout = []
    for group in layout:
        new: list[str] = []
        i = 0
        while i < len(group):
            m = _EXPERT_KEY.match(group[i])
            if m is None:
                new.append(group[i])
                i += 1
                continue
            prefix, run = m.group(1), []
            while i < len(group) and group[i].startswith(prefix) and _EXPERT_KEY.match(group[i]):
                mm = _EXPERT_KEY.match(group[i])
                run.append((int(mm.group(2)), mm.group(3)))
                i += 1
            n_from = n_of(num_local_from, prefix)
            suffixes = [s for j, s in run if j == 0]
            if run != [(j, s) for j in range(n_from) for s in suffixes]:
                raise ConfigError(f"optimizer group's experts of {prefix}* are not {n_from} experts in module order: "
                                  "cannot derive the optimizer layout at another ep_size")
            new += [f"{prefix}{j}{s}" for j in range(n_of(num_local_to, prefix)) for s in suffixes]
        out.append(new)
    return out


# -- reading ------------------------------------------------------------------------------------------
def resolve_tag(ckpt_dir: Path, tag: str | None) -> str:
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise ConfigError(f"{ckpt_dir}: no 'latest' file; name the checkpoint's tag (--tag)")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag / MODEL_FILE).is_file():
        raise ConfigError(f"{ckpt_dir / tag / MODEL_FILE} not found: not a DeepSpeed checkpoint (tag {tag!r})")
    return tag


def saved_ep_size(ckpt_dir: Path, tag: str | None = None) -> int:
    """The expert-parallel degree a checkpoint was saved at: DeepSpeed writes one optimizer file per EP rank
    (0: no optimizer file, a dense model, or ZeRO >= 1)."""
    folder = Path(ckpt_dir) / resolve_tag(ckpt_dir, tag)
    return sum(1 for f in folder.iterdir() if _OPTIM_FILE.match(f.name))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _check_convertible(meta: dict, where: Path) -> None:
    ds = meta.get("ds_config") or {}
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    low = [k for k in ("bf16", "fp16") if (ds.get(k) or {}).get("enabled", False)]
    if stage or low:
        what = f"ZeRO stage {stage}" if stage else low[0]
        raise ConfigError(f"{where} was saved with {what}: its optimizer state lives in DeepSpeed's flat buffers, "
                          "which are not converted across ep_size; only fp32 with ZeRO stage 0 checkpoints "
                          "(ds_configs/cpu_ep.json) are")


def _gate_key(expert_prefix: str) -> str:
    return expert_prefix.replace("experts.deepspeed_experts.", "gate.") + "physical_E"


def read_logical(ckpt_dir: Path, tag: str | None, layout: Layout) -> LogicalState:
    """Every file of one checkpoint tag -> the logical state.  `layout`: the optimizer layout at the ep_size
    the checkpoint was saved at (`saved_ep_size`)."""
    ckpt_dir = Path(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag)
    folder = ckpt_dir / tag
    meta = _load(folder / MODEL_FILE)
    _check_convertible(meta, folder)
    module = meta.pop("module")
    ep_size = saved_ep_size(ckpt_dir, tag)
    if ep_size == 0:
        raise ConfigError(f"{folder} has no expp_rank_*_optim_states.pt: not a DeepSpeed MoE checkpoint with a "
                          "ZeRO stage 0 optimizer")

    # experts, by physical id, per MoE layer
    by_layer: dict[int, dict[int, dict]] = {}
    for f in folder.iterdir():
        m = _EXPERT_FILE.match(f.name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[int(m.group(2))] = _load(f)
    experts, prefixes, logical_of = [], [], {}   # logical_of[(prefix, physical p)] = e
    for layer in range(len(by_layer)):
        files = by_layer[layer]
        num = len(files)
        if sorted(files) != list(range(num)) or num % ep_size:
            raise ConfigError(f"{folder}: MoE layer {layer} has expert files {sorted(files)}; expected 0..E-1 "
                              f"with E divisible by {ep_size}")
        prefix = _EXPERT_KEY.match(next(iter(files[0]))).group(1)
        physical_E = module.get(_gate_key(prefix), torch.arange(num)).long()
        if sorted(physical_E.tolist()) != list(range(num)):
            raise ConfigError(f"{folder}: {_gate_key(prefix)} = {physical_E.tolist()} is not a permutation")
        logical_P = torch.empty_like(physical_E)
        logical_P[physical_E] = torch.arange(num)
        state = {}
        for p, sd in files.items():
            for key, value in sd.items():
                m = _EXPERT_KEY.match(key)
                if m is None or int(m.group(2)) != p or m.group(1) != prefix:
                    raise ConfigError(f"{folder}: unexpected key {key} in expert file {layer}/{p}")
                state[f"{prefix}{int(logical_P[p])}{m.group(3)}"] = value
        for p in range(num):
            logical_of[(prefix, p)] = int(logical_P[p])
        experts.append(state)
        prefixes.append(prefix)

    n_of = {prefix: len(by_layer[i]) // ep_size for i, prefix in enumerate(prefixes)}
    optim, groups = {}, None
    for r in range(ep_size):
        sd = _load(folder / f"expp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer"]
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ConfigError(f"{folder}: EP rank {r}'s optimizer state is not a torch optimizer's state_dict "
                              "(ZeRO >= 1 / bf16 flat buffers are not converted)")
        if [len(g["params"]) for g in sd["param_groups"]] != [len(g) for g in layout]:
            raise ConfigError(f"{folder}: EP rank {r}'s optimizer groups hold {[len(g['params']) for g in sd['param_groups']]}"
                              f" parameters, the model's layout at ep_size {ep_size} {[len(g) for g in layout]}: "
                              "is the config the checkpoint's?")
        if groups is None:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        for g_saved, names in zip(sd["param_groups"], layout):
            for index, name in zip(g_saved["params"], names):
                m = _EXPERT_KEY.match(name)
                if m is not None:
                    p = r * n_of[m.group(1)] + int(m.group(2))
                    name = f"{m.group(1)}{logical_of[(m.group(1), p)]}{m.group(3)}"
                elif r > 0:
                    continue  # non-expert state: replicated on every EP rank, taken from rank 0
                if index in sd["state"]:
                    optim[name] = sd["state"][index]
    params = {**module, **{k: v for s in experts for k, v in s.items()}}
    for name, st in optim.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() and v.shape != params[name].shape:
                raise ConfigError(f"{folder}: optimizer {k} of {name} has shape {tuple(v.shape)}, the parameter "
                                  f"{tuple(params[name].shape)}: the optimizer layout does not match the checkpoint")
    return LogicalState(module, experts, optim, groups or [], meta, ep_size, prefixes)


# -- placement ----------------------------------------------------------------------------------------
def target_placement(state: LogicalState, ep_size: int, how: str | list = "bins") -> list[torch.Tensor]:
    """physical_E per MoE layer for the written checkpoint.

    "bins": every expert on its bin's EP rank at `ep_size` (`plan_physical`: those already there keep their
    slot), where the layer has bins that divide onto the ranks; otherwise the saved placement.  "keep": the
    saved physical ids.  "identity": physical = logical.  A list: one permutation per MoE layer."""
    from ds_smoes.core.placement import plan_physical

    out = []
    for i, prefix in enumerate(state.expert_prefixes):
        num = len({_EXPERT_KEY.match(k).group(2) for k in state.experts[i]})
        if num % ep_size:
            raise ConfigError(f"MoE layer {i} has {num} experts: ep_size {ep_size} does not divide them")
        saved = state.module.get(_gate_key(prefix), torch.arange(num)).long()
        if isinstance(how, (list, tuple)):
            new = torch.as_tensor(how[i]).long()
        elif how == "identity":
            new = torch.arange(num)
        elif how == "keep":
            new = saved.clone()
        elif how == "bins":
            bin_key = _gate_key(prefix).replace("physical_E", "binning.bin_E")
            new = saved.clone()
            if bin_key in state.module:
                bin_E = state.module[bin_key].long()
                num_bins = int(bin_E.max()) + 1
                if num_bins % ep_size == 0:
                    try:
                        new = plan_physical(bin_E, saved, num_bins, ep_size)
                    except ValueError:
                        pass  # bins of unequal size: they cannot all sit on one rank; keep the saved ids
        else:
            raise ConfigError(f"placement {how!r}: use bins, keep, identity or a JSON file of permutations")
        if sorted(new.tolist()) != list(range(num)):
            raise ConfigError(f"placement of MoE layer {i} {new.tolist()} is not a permutation of 0..{num - 1}")
        out.append(new)
    return out


def load_placement_file(path: Path) -> list:
    """A JSON list of per-layer permutations, or {"layers": [{"physical_of_expert": [...]}, ...]}
    (an export's placement.json)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--placement {path}: {err}") from None
    if isinstance(data, dict):
        data = [layer["physical_of_expert"] for layer in data.get("layers", [])]
    return data


# -- writing ------------------------------------------------------------------------------------------
def write_checkpoint(state: LogicalState, out_dir: Path, tag: str, ep_size: int, layout: Layout,
                     placement: list[torch.Tensor]) -> Path:
    """The checkpoint DeepSpeed would have written at `ep_size` with experts at `placement` (physical_E per
    MoE layer).  `layout`: the optimizer layout at `ep_size`.  Returns the tag folder."""
    folder = Path(out_dir) / tag
    folder.mkdir(parents=True, exist_ok=True)
    module = dict(state.module)
    n_of = {}
    for i, prefix in enumerate(state.expert_prefixes):
        physical_E = placement[i].long()
        num = physical_E.numel()
        n_of[prefix] = num // ep_size
        if _gate_key(prefix) in module:
            module[_gate_key(prefix)] = physical_E.to(module[_gate_key(prefix)].dtype)
        files: dict[int, dict] = {}
        for key, value in state.experts[i].items():
            m = _EXPERT_KEY.match(key)
            p = int(physical_E[int(m.group(2))])
            files.setdefault(p, {})[f"{prefix}{p}{m.group(3)}"] = value
        for p, sd in files.items():
            torch.save(sd, folder / f"layer_{i}_expert_{p}_mp_rank_00_model_states.pt")
    torch.save({"module": module, **state.meta}, folder / MODEL_FILE)

    logical_of = {prefix: {int(p): e for e, p in enumerate(placement[i].tolist())}
                  for i, prefix in enumerate(state.expert_prefixes)}
    if len(layout) != len(state.groups):
        raise ConfigError(f"the optimizer at ep_size {ep_size} has {len(layout)} param groups, the checkpoint "
                          f"{len(state.groups)}: one of them splits a group (max_group_size) differently")
    for r in range(ep_size):
        opt_state, groups, index = {}, [], 0
        for hyper, names in zip(state.groups, layout):
            params = []
            for name in names:
                m = _EXPERT_KEY.match(name)
                if m is not None:
                    p = r * n_of[m.group(1)] + int(m.group(2))
                    name = f"{m.group(1)}{logical_of[m.group(1)][p]}{m.group(3)}"
                if name in state.optim:
                    opt_state[index] = state.optim[name]
                params.append(index)
                index += 1
            g = copy.copy(hyper)
            if g.get("moe") and isinstance(g.get("name"), str):
                g["name"] = re.sub(r"ep_size_\d+", f"ep_size_{ep_size}", g["name"])
            groups.append({**g, "params": params})
        torch.save({"optimizer": {"state": opt_state, "param_groups": groups}},
                   folder / f"expp_rank_{r}_mp_rank_00_optim_states.pt")
    (Path(out_dir) / "latest").write_text(tag)
    return folder


def states_equal(a: LogicalState, b: LogicalState) -> list[str]:
    """Where two logical states differ bit for bit (module state but the placement, experts by logical id,
    optimizer state, param groups but the expert group names, the rest of the model-state file)."""
    def diff(x, y, where):
        if torch.is_tensor(x) or torch.is_tensor(y):
            return [] if torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y) \
                else [where]
        if isinstance(x, dict) and isinstance(y, dict):
            if set(x) != set(y):
                return [f"{where} keys {sorted(set(x) ^ set(y), key=str)[:4]}"]
            return [d for k in x for d in diff(x[k], y[k], f"{where}.{k}")]
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            return [d for i, (u, v) in enumerate(zip(x, y)) for d in diff(u, v, f"{where}[{i}]")]
        return [] if x == y else [where]

    return (diff(a.experts, b.experts, "experts") + diff(a.optim, b.optim, "optim")
            + diff({k: v for k, v in a.module.items() if not k.endswith("physical_E")},
                   {k: v for k, v in b.module.items() if not k.endswith("physical_E")}, "module")
            + diff(_unnamed(a.groups), _unnamed(b.groups), "groups") + diff(a.meta, b.meta, "meta"))


def _unnamed(groups: list[dict]) -> list[dict]:
    """Param groups without the expert group name ("ep_size_R" changes with the ep_size by design)."""
    return [{k: v for k, v in g.items() if not (k == "name" and g.get("moe"))} for g in groups]


def reshard_checkpoint(src: Path, src_tag: str | None, src_layout: Layout, out: Path, ep_size: int,
                       layout: Layout, placement: str | list = "bins", out_tag: str | None = None) -> tuple:
    """read_logical + target_placement + write_checkpoint; returns (tag folder written, state, placement)."""
    tag = resolve_tag(src, src_tag)
    state = read_logical(src, tag, src_layout)
    physical = target_placement(state, ep_size, placement)
    return write_checkpoint(state, out, out_tag or tag, ep_size, layout, physical), state, physical
