"""The built-in MoE-LLaVA (`ds_smoes.model.TinyMoEVLM`) as a model family of the training session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ds_smoes.app.config import TrainConfig
from ds_smoes.app.evaluation import exact_match_accuracy, measure_routing
from ds_smoes.app.family import ModelFamily, check_digits_variant, check_images, ensure_digits
from ds_smoes.core.errors import ConfigError
from ds_smoes.data import LlavaDataset, WordTokenizer, collate_train, load_llava_json
from ds_smoes.data.augment import random_shift
from ds_smoes.data.tasks import select_tasks, with_text_share
from ds_smoes.data.tokenizer import split_words
from ds_smoes.model import TinyMoEVLM, model_inputs


@dataclass
class Datasets:
    train: LlavaDataset
    val: LlavaDataset | None
    test: LlavaDataset
    tokenizer: WordTokenizer


def prepare_data(cfg: TrainConfig, log: Callable) -> Datasets:
    d = cfg.data
    ensure_digits(d, log)
    check_digits_variant(d, cfg.model.image_size)
    train = load_llava_json(Path(d.train_json), Path(d.image_folder))
    val = load_llava_json(Path(d.val_json), Path(d.image_folder)) if d.val_json else None
    test = load_llava_json(Path(d.test_json), Path(d.image_folder))
    # Built from the whole training split (same order on every rank, so identical ids everywhere), before any
    # task filter: every stage of the recipe has the same vocabulary.
    tokenizer = WordTokenizer.build(t for s in train for t in (s.prompt, s.answer))
    if d.tasks is not None:
        folder = Path(d.image_folder)
        train, test = select_tasks(train, d.tasks, folder, "train"), select_tasks(test, d.tasks, folder, "test")
        val = select_tasks(val, d.tasks, folder, "val") if val else None
        unknown = sorted({w for s in train for w in split_words(f"{s.prompt} {s.answer}")
                          if tokenizer.encode(w) == [tokenizer.unk_id]})
        if unknown:
            raise ConfigError(f"data.tasks {list(d.tasks)}: the words {unknown} are not in the training split's "
                              "vocabulary")
    train = with_text_share(train, d.text_share, cfg.run.seed)   # a multimodal-heavy mix (stage III)
    m = cfg.model
    check_images({"train": train, "val": val or [], "test": test}, m.image_size)
    image_tokens = m.compress.pre_llm_budget(m.num_patches)   # compressed before the LLM: fewer placeholders
    make = lambda samples: LlavaDataset(samples, tokenizer, m.image_size, m.patch_size, image_tokens)  # noqa: E731
    sets = Datasets(make(train), make(val) if val else None, make(test), tokenizer)
    longest = max(ds.max_seq_len for ds in (sets.train, sets.test) + ((sets.val,) if sets.val else ()))
    if longest > m.max_len:
        raise ConfigError(f"the data has sequences of {longest} tokens but model.max_len={m.max_len}: "
                          f"raise model.max_len (e.g. --set model.max_len={longest + 8})")
    return sets


def dense_run_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], WordTokenizer]:
    """The final weights and the tokenizer of a dense training run (model.moe_layers none): its
    checkpoint/final/mp_rank_00_model_states.pt, where DeepSpeed keeps the whole module when no expert or
    ZeRO-3 partition splits it."""
    cfg_path, tok_path = run_dir / "train_config.json", run_dir / "tokenizer.json"
    for path in (cfg_path, tok_path):
        if not path.is_file():
            raise ConfigError(f"{path} not found: model.start_from must be a dense training run's output_dir")
    dense = TrainConfig.model_validate_json(cfg_path.read_text())
    if dense.model.moe_layers != "none":
        raise ConfigError(f"{run_dir} trained a MoE model (moe_layers {dense.model.moe_layers}): upcycle from a "
                          "dense run (model.moe_layers: none)")
    states = run_dir / "checkpoint" / "final" / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ConfigError(f"{states} not found: the dense run saved no final checkpoint (run.save_checkpoint)")
    # DeepSpeed's own file (it pickles its config with the weights): the run's own output, not foreign data
    blob = torch.load(states, map_location="cpu", weights_only=False)
    return blob["module"], WordTokenizer.load(tok_path)


class BuiltinFamily(ModelFamily):
    """`init_from`: a deployment export (`python -m ds_smoes.export`) whose weights and SMoES buffers the
    model starts from, each EP rank taking its own experts."""

    def __init__(self, cfg: TrainConfig, init_from: Path | None = None) -> None:
        super().__init__(cfg)
        self.init_from = init_from

    def build(self, rank: int, log: Callable) -> None:
        cfg = self.cfg
        self.data = prepare_data(cfg, log)
        self.train_set, self.val_set, self.test_set = self.data.train, self.data.val, self.data.test
        self.collate = collate_train
        log(f"data: {len(self.train_set)} train / {len(self.val_set) if self.val_set else 0} val / "
            f"{len(self.test_set)} test conversations, vocabulary {self.data.tokenizer.vocab_size}, "
            f"{self.train_set.image_tokens} image tokens per image (of {self.train_set.num_patches} patches)")
        ep = cfg.smoes.ep_size
        self.model = TinyMoEVLM(cfg.model, self.data.tokenizer.vocab_size, self.data.tokenizer.image_id,
                                cfg.smoes if cfg.model.moe_layers != "none" else None,
                                expert_seed=cfg.run.seed, ep_rank=rank % ep)
        if self.init_from is not None and cfg.model.start_from is not None:
            raise ConfigError("--init-from and model.start_from both set the weights: give one of them")
        if self.init_from is not None:
            self._load_export(Path(self.init_from), ep, rank % ep, log)
        if cfg.model.start_from is not None:
            self._start_from(Path(cfg.model.start_from), rank % ep, log)
        self._aug_seed, self._aug_gen = cfg.run.seed * 7919 + rank, torch.Generator()

    def begin_step(self, step: int) -> None:
        """The augmentation's generator is a pure function of (seed, rank, step): a run resumed at step s draws
        the shifts the uninterrupted run drew there, with no generator state in the checkpoint."""
        self._aug_gen.manual_seed(self._aug_seed * 1_000_003 + step)

    def _load_export(self, export_dir: Path, ep_size: int, ep_rank: int, log: Callable) -> None:
        from ds_smoes.app.export import load_export

        tok_path = export_dir / "tokenizer.json"
        if tok_path.is_file() and WordTokenizer.load(tok_path) != self.data.tokenizer:
            raise ConfigError(f"{tok_path} differs from the vocabulary built from data.train_json: the export was "
                              "trained on other data; point data.* at the export's data (its train_config.json)")
        load_export(self.model, export_dir, ep_size, ep_rank)
        log(f"initialised from the export {export_dir}")

    def _start_from(self, run_dir: Path, ep_rank: int, log: Callable) -> None:
        from ds_smoes.model.upcycle import upcycle_from_dense

        state, tokenizer = dense_run_state(run_dir)
        if tokenizer != self.data.tokenizer:
            raise ConfigError(f"{run_dir / 'tokenizer.json'} differs from the vocabulary built from data.train_json: "
                              "the dense run was trained on other data; start from a run on the same training split")
        done = upcycle_from_dense(self.model, state, self.cfg.model.upcycle_noise, self.cfg.run.seed, ep_rank)
        moe = self.model.moe_layers()
        if not moe:
            log(f"started from the dense run {run_dir}: {done['copied']} tensors copied")
            return
        log(f"upcycled from the dense run {run_dir}: {done['copied']} tensors copied, every expert of the "
            f"{len(moe)} MoE blocks a copy of its block's FFN "
            f"(noise {self.cfg.model.upcycle_noise:g}; {done['expert_tensors']} expert tensors on this rank)")

    def describe(self) -> str:
        s = self.cfg.smoes
        n_params = sum(p.numel() for p in self.model.parameters())
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        held = f", {frozen / 1e3:.0f}k of them frozen" if frozen else ""
        return (f"model: {n_params / 1e3:.0f}k parameters on rank 0{held} ({len(self.model.moe_layers())} MoE "
                f"layers, gate {s.gate}, {s.num_experts} experts, top-{s.k}, {s.num_bins} bins, ep_size {s.ep_size}, "
                f"score {s.score_type}, binning {s.binning})")

    def run_name(self) -> str:
        s = self.cfg.smoes
        return f"{s.gate}-{s.score_type}-b{s.num_bins}-k{s.k}-seed{self.cfg.run.seed}"

    def forward(self, engine, batch, device: torch.device):
        batch.image_BCHW = random_shift(batch.image_BCHW, self.cfg.data.augment_max_shift, self._aug_gen)
        batch = batch.to(device)
        return engine(*model_inputs(batch), batch.labels_BT)

    def num_tokens(self, batch) -> int:
        return int(batch.attention_mask_BT.sum())

    def evaluate(self, module, dataset, device, with_routing: bool):
        r = self.cfg.run
        # the final evaluation (with_routing) also times the prefill
        acc = exact_match_accuracy(module, dataset, r.eval_batch_size, r.max_new_tokens, device, timing=with_routing)
        routing = measure_routing(module, dataset, r.eval_batch_size, device) if with_routing else None
        return acc, routing

    def tags(self) -> dict[str, str]:
        c = self.cfg.model.compress
        return {**super().tags(), "compress_method": c.method, "keep_ratio": f"{c.keep_ratio:g}"}

    def final_figures(self) -> dict:
        """Vision tokens per image: the patches, what enters the LLM (the pre-LLM budget) and what reaches its last
        layers (after in-LLM pruning: the final budget), as `model.compress` sets them for every image."""
        m = self.cfg.model
        c = m.compress
        kept = c.budget(m.num_patches) if c.in_llm_layer(m.n_layers) is not None else c.pre_llm_budget(m.num_patches)
        return {"compress_method": c.method, "keep_ratio": c.keep_ratio, "vision_patches_per_image": m.num_patches,
                "vision_tokens_pre_llm": c.pre_llm_budget(m.num_patches), "vision_tokens_kept": kept,
                "in_llm_layer": c.in_llm_layer(m.n_layers)}

    def save_artifacts(self, out_dir: Path, final: dict, tracker) -> None:
        self.data.tokenizer.save(out_dir / "tokenizer.json")
        tracker.log_file(out_dir / "tokenizer.json")

