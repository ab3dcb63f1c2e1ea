"""The recipe's pieces (docs/recipe.md): the stages' data (task filter, captions), the frozen language model of
stage I, the seeded augmentation streams a resumed run continues, the pipeline's plan (what each stage trains,
from where, and when a stage may be reused) and, end to end on 2 ranks, a pipeline that skips finished stages
and resumes an interrupted one with an MLflow parent and a child per stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ds_smoes.core.errors import ConfigError, DatasetError
from ds_smoes.data.digits import number_word, sklearn_digits
from ds_smoes.data.llava import load_llava_json
from ds_smoes.data.tasks import CAPTION_QUESTION, CAPTION_TASK, caption_samples, select_tasks
from launch import ROOT, env


# -- data ---------------------------------------------------------------------------------------------------------
def test_captions_name_each_image_s_digit_once(canvas32_dir):
    samples = load_llava_json(canvas32_dir / "train.json", canvas32_dir)
    captions = caption_samples(samples, canvas32_dir)
    images = {s.image_path for s in samples if s.image_path is not None}
    assert len(captions) == len(images) and {c.image_path for c in captions} == images
    _, labels = sklearn_digits()
    for c in captions:
        assert c.answer == number_word(int(labels[int(c.image_path.stem)]))
        assert c.prompt == CAPTION_QUESTION and c.task == CAPTION_TASK
    # the split's own "which digit" answers agree with the captions
    by_image = {c.image_path: c.answer for c in captions}
    name = [s for s in samples if s.task == "digit_name"]
    assert name and all(by_image[s.image_path] == s.answer for s in name)


def test_select_tasks_keeps_the_named_tasks_and_refuses_unknown_or_empty(canvas32_dir, digits_dir):
    samples = load_llava_json(canvas32_dir / "test.json", canvas32_dir)
    text = select_tasks(samples, ("text_plus", "text_minus"), canvas32_dir, "test")
    assert text and {s.task for s in text} == {"text_plus", "text_minus"}
    assert select_tasks(samples, None, canvas32_dir, "test") == samples
    mixed = select_tasks(samples, (CAPTION_TASK, "digit_where"), canvas32_dir, "test")
    assert {s.task for s in mixed} == {CAPTION_TASK, "digit_where"}
    with pytest.raises(DatasetError, match=r"data.tasks names \['digit_colour'\].*its tasks are"):
        select_tasks(samples, ("digit_colour",), canvas32_dir, "test")
    plain = load_llava_json(digits_dir / "test.json", digits_dir)
    with pytest.raises(DatasetError, match=r"needs the canvas digits"):
        select_tasks(plain, (CAPTION_TASK,), digits_dir, "test")


def test_the_caption_words_are_in_the_training_vocabulary(canvas32_dir):
    from ds_smoes.data import WordTokenizer

    samples = load_llava_json(canvas32_dir / "train.json", canvas32_dir)
    tok = WordTokenizer.build(t for s in samples for t in (s.prompt, s.answer))
    for c in caption_samples(samples, canvas32_dir):
        assert tok.unk_id not in tok.encode(f"{c.prompt} {c.answer}")


# -- frozen parts --------------------------------------------------------------------------------------------------
def test_a_frozen_decoder_gets_no_update_nor_optimizer_state_while_the_projector_learns():
    from ds_smoes.app.session import optimizer_groups
    from ds_smoes.model import TinyMoEVLM
    from ds_smoes.model.config import ModelConfig

    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, image_size=8, patch_size=4, vision_dim=16,
                      moe_layers="none", freeze_decoder=True, freeze_vision=True)
    model = TinyMoEVLM(cfg, vocab_size=12, image_token_id=11, smoes=None)
    frozen = [model.tok_emb, model.pos_emb, model.blocks, model.ln_f, model.lm_head, model.vision]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=0.1)
    ids = torch.tensor([[1, 11, 11, 11, 11, 3, 4]])
    for _ in range(2):
        out = model(ids, torch.ones_like(ids, dtype=torch.bool), (ids == 11).long(), torch.rand(1, 1, 8, 8),
                    torch.tensor([True]), labels_BT=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    for part in frozen:
        assert all(p.grad is None and p not in opt.state for p in part.parameters())
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("projector.") for k in changed), changed
    with pytest.raises(ValueError, match="freeze_decoder is for the dense stages"):
        ModelConfig(freeze_decoder=True)


# -- seeded streams --------------------------------------------------------------------------------------------------
def test_the_training_shift_is_a_function_of_seed_rank_and_step():
    """A run resumed at step 3 draws the shifts the uninterrupted run drew at steps 3 and 4."""
    from ds_smoes.app.builtin import BuiltinFamily
    from ds_smoes.app.config import TrainConfig
    from ds_smoes.data.augment import random_shift

    def shifts(family, steps):
        out = []
        for step in steps:
            family.begin_step(step)
            out.append(random_shift(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 2,
                                    family._aug_gen))
        return out

    a, b, other_rank = (BuiltinFamily(TrainConfig()) for _ in range(3))
    for fam, rank in ((a, 0), (b, 0), (other_rank, 1)):
        fam._aug_seed, fam._aug_gen = 7919 * 0 + rank, torch.Generator()
    full = shifts(a, range(5))
    resumed = shifts(b, range(3, 5))
    assert all(torch.equal(x, y) for x, y in zip(full[3:], resumed))
    assert not torch.equal(full[3], full[4])
    assert not all(torch.equal(x, y) for x, y in zip(full, shifts(other_rank, range(5))))


def test_stage_0_resumed_after_an_interruption_ends_with_the_uninterrupted_encoder(canvas32_dir, tmp_path):
    from ds_smoes.app.config import load_train_config
    from ds_smoes.app.pretrain_vision import STATE_FILE, pretrain

    cfg = load_train_config(ROOT / "configs" / "canvas.yaml", [
        f"data.image_folder={canvas32_dir}", f"data.train_json={canvas32_dir / 'train.json'}",
        f"data.val_json={canvas32_dir / 'val.json'}", f"data.test_json={canvas32_dir / 'test.json'}",
        "model.vision_layers=1"])
    quiet = lambda *a: None  # noqa: E731
    torch.set_num_threads(2)
    pretrain(cfg, 3, 128, 2e-3, 5, tmp_path / "whole", log=quiet)

    class Stop(Exception):
        pass

    def stop_after_two(epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        pretrain(cfg, 3, 128, 2e-3, 5, tmp_path / "cut", log=quiet, on_epoch=stop_after_two)
    assert (tmp_path / "cut" / STATE_FILE).is_file() and not (tmp_path / "cut" / "encoder.pt").exists()
    lines = []
    m = pretrain(cfg, 3, 128, 2e-3, 5, tmp_path / "cut", log=lines.append)
    assert m["resumed_at_epoch"] == 2 and any("resuming" in line for line in lines)
    assert not (tmp_path / "cut" / STATE_FILE).exists()
    whole = torch.load(tmp_path / "whole" / "encoder.pt", weights_only=True)["state_dict"]
    cut = torch.load(tmp_path / "cut" / "encoder.pt", weights_only=True)["state_dict"]
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    # other settings: the state is not used
    lines.clear()
    with pytest.raises(Stop):
        pretrain(cfg, 3, 128, 2e-3, 5, tmp_path / "other", log=quiet, on_epoch=stop_after_two)
    m = pretrain(cfg, 3, 128, 1e-3, 5, tmp_path / "other", log=lines.append)
    assert m["resumed_at_epoch"] == 0 and any("other settings" in line for line in lines)


# -- the pipeline's plan ----------------------------------------------------------------------------------------
def _pipeline(tmp_path, **fields):
    from ds_smoes.app.pipeline_config import PipelineConfig

    return PipelineConfig(train_config=ROOT / "configs" / "canvas.yaml", out_dir=tmp_path, **fields)


def test_each_stage_trains_what_the_recipe_says_from_the_stage_before(tmp_path):
    from ds_smoes.app.pipeline import plan

    stages = {s.name: s for s in plan(_pipeline(tmp_path, seed=3, variant="topk"))}
    assert list(stages) == ["vision", "language", "align", "dense", "moe"]
    root = tmp_path / "seed3"
    lang, align, dense, moe = (stages[n].settings for n in ("language", "align", "dense", "moe"))
    assert lang["data"]["tasks"] == ["language_only"]
    assert lang["model"]["vision_checkpoint"] == str(root / "vision" / "encoder.pt")
    assert lang["model"]["freeze_projector"] and lang["model"]["moe_layers"] == "none"
    assert align["data"]["tasks"] == [CAPTION_TASK] and align["model"]["freeze_decoder"]
    assert align["model"]["start_from"] == str(root / "language") and align["model"]["freeze_vision"]
    assert dense["model"]["start_from"] == str(root / "align") and dense["data"]["tasks"] is None
    assert moe["model"]["start_from"] == str(root / "dense") and moe["model"]["moe_layers"] == "every_other"
    assert moe["smoes"]["gate"] == "topk" and stages["moe"].directory == root / "moe-topk"
    assert all(s["run"]["checkpoint_every_epoch"] and s["run"]["seed"] == 3 for s in (lang, align, dense, moe))


def test_another_gate_reuses_stages_0_to_ii_and_a_changed_stage_changes_all_after_it(tmp_path):
    from ds_smoes.app.pipeline import plan

    def prints(**fields):
        return {s.name: s.fingerprint for s in plan(_pipeline(tmp_path, **fields))}

    base = prints()
    other_gate = prints(variant="ltdr")
    assert [n for n in base if base[n] != other_gate[n]] == ["moe"]
    longer_vision = prints(vision={"epochs": 31})
    assert all(base[n] != longer_vision[n] for n in base)
    longer_align = prints(align={"epochs": 6})
    assert [n for n in base if base[n] != longer_align[n]] == ["align", "dense", "moe"]
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        _pipeline(tmp_path, variant="nope")


def test_a_compression_setting_changes_the_recipe_from_stage_i_and_shares_stage_0_and_the_language_stage(tmp_path):
    from ds_smoes.app.pipeline import plan

    gate = {s.name: s for s in plan(_pipeline(tmp_path))}
    qmop = {s.name: s for s in plan(_pipeline(tmp_path, variant="qmop-0.25", seed=0))}
    assert [qmop[n].fingerprint == gate[n].fingerprint for n in gate] == [True, True, False, False, False]
    assert [qmop[n].directory.name for n in qmop] == ["vision", "language", "align-qmop-0.25", "dense-qmop-0.25",
                                                       "moe-qmop-0.25"]
    for name in ("align", "dense", "moe"):
        compress = qmop[name].settings["model"]["compress"]
        assert compress["method"] == "qmop" and compress["keep_ratio"] == 0.25
    assert qmop["moe"].settings["smoes"]["gate"] == gate["moe"].settings["smoes"]["gate"]
    assert qmop["dense"].settings["model"]["start_from"] == str(tmp_path / "seed0" / "align-qmop-0.25")
    none = {s.name: s for s in plan(_pipeline(tmp_path, variant="none"))}
    assert [none[n].fingerprint == gate[n].fingerprint for n in gate] == [True, True, True, True, False]


def test_a_finished_stage_under_other_settings_is_refused_and_an_interrupted_one_starts_afresh(tmp_path):
    from ds_smoes.app.pipeline import STAGE_FILE, plan, stage_state

    stage = plan(_pipeline(tmp_path))[2]
    assert stage_state(stage) == "fresh"
    stage.directory.mkdir(parents=True)
    record = {"stage": stage.name, "format": 2, "fingerprint": stage.fingerprint, "settings": stage.settings}
    (stage.directory / STAGE_FILE).write_text(json.dumps(record, default=str))
    assert stage_state(stage) == "resume"
    (stage.directory / "metrics.json").write_text("{}")
    assert stage_state(stage) == "done"
    changed = plan(_pipeline(tmp_path, align={"epochs": 7}))[2]
    with pytest.raises(ConfigError, match=r"align stage .* finished under other settings \(.*optim.epochs: 10.0 -> 7.0"):
        stage_state(changed)
    (stage.directory / "metrics.json").unlink()
    assert stage_state(changed) == "fresh" and not stage.directory.exists()


def test_a_setting_added_later_at_its_default_keeps_a_stage_s_fingerprint(tmp_path):
    """Upgrading ds-smoes (a new config field, at its default) must not make finished stages look foreign; a
    stage.json of the first format (every setting hashed) is still recognised."""
    import dataclasses

    from ds_smoes.app.pipeline import STAGE_FILE, plan, stage_state, without_defaults

    assert without_defaults({"a": 1, "b": {"c": 2, "d": 3}, "e": 5}, {"a": 1, "b": {"c": 2, "d": 0}}) == \
        {"b": {"d": 3}, "e": 5}
    stage = plan(_pipeline(tmp_path))[3]
    newer = dataclasses.replace(stage, settings={**stage.settings, "run": {**stage.settings["run"], "new_knob": 7}},
                                defaults={**stage.defaults, "run": {**stage.defaults["run"], "new_knob": 7}})
    assert newer.fingerprint == stage.fingerprint
    changed = dataclasses.replace(newer, settings={**newer.settings, "run": {**newer.settings["run"], "new_knob": 8}})
    assert changed.fingerprint != stage.fingerprint
    stage.directory.mkdir(parents=True)
    (stage.directory / "metrics.json").write_text("{}")
    (stage.directory / STAGE_FILE).write_text(json.dumps({"fingerprint": stage.legacy_fingerprint,
                                                          "settings": stage.settings}, default=str))
    assert stage_state(stage) == "done"


# -- end to end --------------------------------------------------------------------------------------------------
def _small_recipe(tmp_path, canvas32_dir) -> Path:
    """A pipeline over a few steps per stage, the test split cut to 48 conversations (both kinds)."""
    test = json.loads((canvas32_dir / "test.json").read_text())
    (tmp_path / "test48.json").write_text(json.dumps([r for r in test if "image" in r][:24]
                                                     + [r for r in test if "image" not in r][:24]))
    train = yaml.safe_load((ROOT / "configs" / "canvas.yaml").read_text())
    train["data"].update(train_json=str(canvas32_dir / "train.json"), val_json=None,
                         test_json=str(tmp_path / "test48.json"), image_folder=str(canvas32_dir))
    train["model"].update(vision_layers=1)
    train["run"].update(deepspeed_config=str(ROOT / "ds_configs" / "cpu_ep.json"), eval_every_epoch=False,
                        output_dir=str(tmp_path / "unused"))
    train["smoes"].update(rebin_freeze_step=10_000)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    short = ["optim.max_steps=3", "optim.warmup_steps=1"]
    recipe = {"train_config": "train.yaml", "out_dir": "recipe", "vision": {"epochs": 1, "batch_size": 256},
              "language": {"epochs": 1, "set": short}, "align": {"epochs": 1, "set": short},
              "dense": {"epochs": 1, "set": short},
              # two epochs of 8 steps on one small task: time to interrupt after the first
              "moe": {"epochs": 2, "set": ["data.tasks=[text_greater]", "optim.micro_batch_size=40"]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def _runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ds-smoes-recipe")
    return client.search_runs([exp.experiment_id], max_results=200)


@pytest.mark.slow
def test_the_pipeline_skips_finished_stages_and_resumes_an_interrupted_one(tmp_path, canvas32_dir):
    config = _small_recipe(tmp_path, canvas32_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "ds_smoes.pipeline", "--config", str(config), "--tracking-uri", uri]
    first = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = tmp_path / "recipe" / "seed0"
    for name in ("vision", "language", "align", "dense", "moe-smoes"):
        assert (root / name / "metrics.json").is_file(), name
    assert "== recipe, seed 0, stage III gate smoes" in first.stdout
    assert "upcycled from the dense run" in (root / "moe-smoes" / "train.log").read_text()
    parent = next(r for r in _runs(uri) if r.data.tags.get("kind") == "recipe")
    children = [r for r in _runs(uri) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == ["align", "dense", "language", "moe", "vision"]
    assert parent.info.status == "FINISHED" and "acc_language" in parent.data.metrics  # stage III's figures

    # another gate: stages 0-II reused; its MoE stage interrupted (Ctrl-C) after its first epoch, then resumed
    proc = subprocess.Popen([*cmd, "--variant", "topk"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    latest = root / "moe-topk" / "checkpoint" / "latest"
    deadline = time.time() + 600
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert latest.is_file(), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert out.count("finished before, reused") == 4 and "run the same command again to resume" in out
    assert not (root / "moe-topk" / "metrics.json").exists()

    again = subprocess.run([*cmd, "--variant", "topk"], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "== moe: resuming" in again.stdout and "resumed from" in again.stdout and "at epoch 1" in again.stdout
    m = json.loads((root / "moe-topk" / "metrics.json").read_text())
    assert 0 < m["steps_this_run"] < m["steps"]
    summary = json.loads((root / "pipeline-topk.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["reused"] * 4 + ["resumed"]
    last = max((r for r in _runs(uri) if r.data.tags.get("kind") == "recipe"), key=lambda r: r.info.start_time)
    kids = [r for r in _runs(uri) if r.data.tags.get("mlflow.parentRunId") == last.info.run_id]
    assert sorted((r.data.tags["stage"], r.data.tags["reused"]) for r in kids) == [
        ("align", "true"), ("dense", "true"), ("language", "true"), ("moe", "false"), ("vision", "true")]
