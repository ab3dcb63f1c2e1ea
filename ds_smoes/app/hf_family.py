"""A Hugging Face MoE-VLM converted to SMoES (`--hf-model`) as a model family of the training session.

Loads the model, converts its MoE blocks (or upcycles its MLPs, or, with `hf.backend: autoep`, leaves the blocks to
DeepSpeed's AutoEP and puts the gate on its layers once the engine is built), reads LLaVA-format data through the
model's chat template and image processor, evaluates by greedy decoding, and at the end exports with
save_pretrained to the original architecture (docs/hf.md).  Engine, loop, placement, checkpoints and
tracking are the session's (`ds_smoes.app.session`), as for the built-in model.
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ds_smoes.app.evaluation import RoutingAccumulator, lockstep_batches, median_ms_per_sample
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.app.family import ModelFamily, check_images, ensure_digits
from ds_smoes.app.hf_config import HFTrainConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.data import load_llava_json
from ds_smoes.data.tasks import select_tasks, with_text_share
from ds_smoes.hf.autoep import adopt_autoep, autoep_section, prepare_autoep
from ds_smoes.hf.data import HFConversationDataset, VLMTextCodec, collate
from ds_smoes.hf.export import export_pretrained
from ds_smoes.hf.load import load_hf_model, to_smoes
from ds_smoes.hf.model import SMoESHFModel
from ds_smoes.parallel import distributed


def model_inputs(model: SMoESHFModel, batch: dict, with_labels: bool = True) -> dict:
    """The batch plus what the architecture derives from the ids (Qwen3-VL: mm_token_type_ids)."""
    inputs = {k: v for k, v in batch.items() if with_labels or k != "labels"}
    extra = model.adapter.extra_inputs
    if extra is not None:
        inputs.update(extra(model.hf_model.config, inputs["input_ids"]))
    return inputs


@torch.no_grad()
def greedy_answers(model: SMoESHFModel, dataset: HFConversationDataset, idx: list[int], pad_id: int, eos_id: int,
                   max_new_tokens: int, device, prefill_seconds: list[float] | None = None) -> list[str]:
    """Greedy decoding from left-padded prompts, always `max_new_tokens` forwards (every EP rank takes part
    in the same number of all-to-alls); the text up to the first eos.  `prefill_seconds` gets the time of the
    first forward, the one over the whole prompts (synchronised on a GPU: evaluation only)."""
    batch = collate([dataset.item(i, with_answer=False) for i in idx], pad_id, left=True)
    batch.pop("labels")
    batch = {k: v.to(device) for k, v in batch.items()}
    new = []
    for _ in range(max_new_tokens):
        inputs = model_inputs(model, batch, with_labels=False)
        if model.adapter.extra_inputs is None:   # 1-D positions from the mask (left padding)
            inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        timed = prefill_seconds is not None and not new
        if timed:
            t0 = _synced_time(device)
        nxt_B = model(**inputs, use_cache=False).logits[:, -1].argmax(-1)
        if timed:
            prefill_seconds.append(_synced_time(device) - t0)
        new.append(nxt_B)
        batch["input_ids"] = torch.cat([batch["input_ids"], nxt_B[:, None]], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(nxt_B[:, None])], 1)
    texts = []
    for row in torch.stack(new, 1).tolist():
        row = row[:row.index(eos_id)] if eos_id in row else row
        texts.append(dataset.codec.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def _synced_time(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def evaluate(model: SMoESHFModel, dataset: HFConversationDataset, batch_size: int, max_new_tokens: int, device,
             pad_id: int, eos_id: int, with_routing: bool = True):
    """Exact-match accuracy per question kind and (with_routing) the teacher-forced routing and test loss,
    from one pass."""
    was = model.training
    model.eval()
    layers = model.moe_layers()
    acc = RoutingAccumulator(layers)
    counts = torch.zeros(6, dtype=torch.float64)   # loss sum, batches, correct mm, mm, correct lang, lang
    prefill, rows = [], []                          # with_routing (the final evaluation): the prefill times
    for idx, counted in lockstep_batches(len(dataset), distributed.rank(), distributed.world_size(), batch_size):
        if with_routing:
            batch = collate([dataset[i] for i in idx], pad_id)
            keep_B = torch.tensor(counted)
            batch["attention_mask"] = batch["attention_mask"] * keep_B[:, None]
            batch["labels"][~keep_B] = -100
            batch = {k: v.to(device) for k, v in batch.items()}
            with RoutingCollector(layers) as collector:
                out = model(**model_inputs(model, batch))
            acc.add(collector.take())
            counts[0] += float(out.lm_loss) * float(keep_B.any())
            counts[1] += float(keep_B.any())
        rows.append(len(idx))
        for i, keep, text in zip(idx, counted, greedy_answers(model, dataset, idx, pad_id, eos_id, max_new_tokens,
                                                               device, prefill if with_routing else None)):
            if keep:
                slot = 2 if dataset.is_multimodal(i) else 4
                counts[slot] += float(text.lower() == dataset.answer(i).strip().lower())
                counts[slot + 1] += 1
    distributed.world_sum_(counts)
    model.train(was)
    c = counts.tolist()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    accuracy = {"acc_multimodal": ratio(c[2], c[3]), "acc_language": ratio(c[4], c[5]),
                "acc_overall": ratio(c[2] + c[4], c[3] + c[5]), "num_multimodal": int(c[3]),
                "num_language": int(c[5])}
    if not with_routing:
        return accuracy, None
    slowest = distributed.world_max_(torch.tensor([median_ms_per_sample(prefill, rows)], dtype=torch.float64))
    accuracy["prefill_ms_per_sample"] = float(slowest[0])
    return accuracy, acc.result(ratio(c[0], c[1]), num_samples=len(dataset))


def every_parameter_zero(params: list[torch.Tensor]) -> torch.Tensor:
    """0 with a (zero) gradient path to every parameter.  A rank whose batch has no image leaves the
    vision tower without gradients; ZeRO-2 then reduces different buckets on different ranks (a
    collective mismatch).  Adding this to the loss gives every rank the same set of gradients."""
    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


class HFFamily(ModelFamily):
    cfg: HFTrainConfig

    def build(self, rank: int, log: Callable) -> None:
        cfg = self.cfg
        self.hf_model, processor_dir = load_hf_model(cfg.hf.model, cfg.hf.attn_implementation, cfg.run.seed)
        if cfg.hf.backend == "autoep":   # the blocks stay for deepspeed.initialize's AutoEP (engine_built adopts)
            self.model = prepare_autoep(self.hf_model, cfg.smoes)
        else:
            self.model = to_smoes(self.hf_model, cfg.smoes, cfg.hf.mode, cfg.hf.upcycle_layers, seed=cfg.run.seed)
        self.codec = VLMTextCodec.load(cfg.hf.processor or processor_dir, self.hf_model.config, self.model.adapter,
                                       cfg.hf.image_size)
        tok = self.codec.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if tok.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos token: set one (tokenizer.eos_token) and save it again")
        self.eos_id = tok.eos_token_id
        d = cfg.data
        ensure_digits(d, log)
        def make(path, split):   # data.tasks keeps the named tasks, as for the built-in model
            samples = select_tasks(load_llava_json(Path(path), Path(d.image_folder)), d.tasks, Path(d.image_folder),
                                   split)
            return HFConversationDataset(samples, self.codec)

        self.train_set, self.test_set = make(d.train_json, "train"), make(d.test_json, "test")
        self.train_set.samples = with_text_share(self.train_set.samples, d.text_share, cfg.run.seed)
        self.val_set = make(d.val_json, "val") if d.val_json else None
        # every referenced image decodes, or one message from whichever rank found the problem (a decode check:
        # the processor does its own resizing later)
        check_images({"train": self.train_set.samples, "val": self.val_set.samples if self.val_set else [],
                      "test": self.test_set.samples}, image_size=8)
        self.collate = partial(collate, pad_id=self.pad_id)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def deepspeed_config(self, ds_config: dict) -> dict:
        section = ds_config.get("expert_parallel")
        if self.cfg.hf.backend == "autoep":
            return {**ds_config, "expert_parallel": autoep_section(self.model, section or {})}
        if section and section.get("enabled"):
            raise ConfigError(f"{self.cfg.run.deepspeed_config} enables DeepSpeed's AutoEP (expert_parallel) but "
                              "hf.backend=ds_smoes converts the MoE blocks itself: set hf.backend=autoep, or remove "
                              "the expert_parallel section")
        return ds_config

    def engine_built(self, engine) -> None:
        if self.cfg.hf.backend == "autoep":
            adopt_autoep(self.model)
            # AutoEP replaced the blocks' parameters: the ones to keep in every rank's graph are the new ones
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def smoes(self):
        """The config's smoes section with num_experts, k and normalize_topk read from the converted model."""
        return self.model.smoes

    def describe(self) -> str:
        smoes, m = self.model.smoes, self.model
        how = "AutoEP" if m.backend == "autoep" else "upcycled" if m.upcycled else "converted"
        return (f"hf model: {type(self.hf_model).__name__} ({self.hf_model.config.model_type}), "
                f"{how} {len(m.moe_layers())} MoE layers, gate {smoes.gate}, "
                f"{smoes.num_experts} experts, top-{smoes.k}, {smoes.num_bins} bins, ep_size {smoes.ep_size}, "
                f"score {smoes.score_type}, binning {smoes.binning}; data: {len(self.train_set)} train / "
                f"{len(self.val_set) if self.val_set else 0} val / {len(self.test_set)} test")

    def run_name(self) -> str:
        s = self.model.smoes
        return f"hf-{self.hf_model.config.model_type}-{s.score_type}-b{s.num_bins}"

    def tags(self) -> dict[str, str]:
        return {**super().tags(), "hf.model_type": self.hf_model.config.model_type,
                "hf.mode": "upcycle" if self.model.upcycled else "convert", "hf.backend": self.model.backend}

    def resolved_config(self) -> dict:
        resolved = super().resolved_config()
        resolved["smoes"] = json.loads(self.model.smoes.model_dump_json())  # num_experts, k from the model
        return resolved

    def forward(self, engine, batch, device):
        batch = {k: v.to(device) for k, v in batch.items()}
        return engine(**model_inputs(self.model, batch))

    def num_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def train_loss(self, out) -> torch.Tensor:
        return out.loss + every_parameter_zero(self.trainable)

    def evaluate(self, module, dataset, device, with_routing: bool):
        r = self.cfg.run
        return evaluate(module, dataset, r.eval_batch_size, r.max_new_tokens, device, self.pad_id, self.eos_id,
                        with_routing)

    def final_figures(self) -> dict:
        return {"hf_model_type": self.hf_model.config.model_type}

    def export(self, out_dir: Path, log: Callable) -> dict:
        if not self.cfg.hf.export:
            return {}
        export_dir = export_pretrained(self.model, out_dir / "hf_export")
        if export_dir is None:   # ranks other than 0 take part in the gather only
            return {}
        self.codec.tokenizer.save_pretrained(export_dir)
        self.codec.image_processor.save_pretrained(export_dir)
        if self.codec.chat_template:
            (export_dir / "chat_template.jinja").write_text(self.codec.chat_template)
        log(f"exported to {export_dir} (loads with AutoModelForImageTextToText.from_pretrained)")
        return {"export_dir": str(export_dir)}

    def save_artifacts(self, out_dir: Path, final: dict, tracker) -> None:
        if "export_dir" in final:
            tracker.set_tags({"hf.export_dir": final["export_dir"]})
