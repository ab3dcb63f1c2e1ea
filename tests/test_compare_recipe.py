"""The evidence's statistics and data: paired differences over seeds with a t interval (hand-computed), the
gate comparison's rows, the "sums" language questions (test questions never in training) and the
multimodal-heavy stage-III mix."""
from __future__ import annotations

import json
import math

import pytest

from ds_smoes.app.compare_recipe import markdown_table, run_figures, summarize
from ds_smoes.core.paired import paired_difference
from ds_smoes.data.digits import SUM_COUNTS, SUM_TASKS, generate_digits_dataset, spelled, sum_question
from ds_smoes.data.llava import Sample
from ds_smoes.data.tasks import LANGUAGE_ONLY, select_tasks, with_text_share


def test_paired_difference_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d.mean == 2.0 and d.n == 3
    assert math.isclose(d.half_width, 2.484138, rel_tol=1e-6)
    assert math.isclose(d.low, 2 - 2.484138, rel_tol=1e-6) and not d.excludes_zero()
    # a shared seed effect cancels: large spread between seeds, constant difference -> zero width
    same = paired_difference([0.5, 0.9, 0.7], [0.4, 0.8, 0.6])
    assert math.isclose(same.mean, 0.1) and same.half_width < 1e-12 and same.excludes_zero()
    assert math.isnan(paired_difference([1.0], [0.5]).half_width)
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([1.0, 2.0], [1.0])


def _run(mm, lang3, lang2, bytes_=300.0, stock=700.0):
    return run_figures({"acc_multimodal": mm, "acc_language": lang3, "msi": 0.5, "cross_rank_rate": 0.6,
                        "bytes_per_token": bytes_, "stock_bytes_per_token": stock, "bytes_per_sample": 9000.0,
                        "tokens_per_s": 1e4, "acc_by_task": {"digit_where": 1.0}},
                       {"acc_language": lang2, "acc_multimodal": 0.9})


def test_the_gate_rows_pair_each_seed_with_the_reference_s_same_seed():
    results = {"topk": {0: _run(0.90, 0.70, 0.80, 700, 700), 1: _run(0.80, 0.60, 0.80, 690, 690)},
               "smoes": {0: _run(0.92, 0.76, 0.80), 1: _run(0.83, 0.70, 0.80)}}
    rows = {r["variant"]: r for r in summarize(results)}
    assert rows["topk"]["delta_acc_multimodal"] is None
    d = rows["smoes"]["delta_acc_multimodal"]             # +2 and +3 points
    assert math.isclose(d["mean"], 2.5) and d["n"] == 2
    # sd of (2, 3) = sqrt(0.5); t(0.975, 1) = 12.706205
    assert math.isclose(d["high"] - d["mean"], 12.706205 * math.sqrt(0.5) / math.sqrt(2), rel_tol=1e-6)
    r = rows["smoes"]["delta_retention"]                  # retention -10/-20 (topk) against -4/-10 (smoes)
    assert math.isclose(r["mean"], 8.0)
    assert math.isclose(rows["smoes"]["retention"], (-0.04 - 0.10) / 2)
    assert math.isclose(rows["smoes"]["bytes_vs_reference_stock"], 300 / 695)
    assert "| smoes | 0,1 |" in markdown_table(list(rows.values()))


def test_sums_are_spelled_digit_by_digit():
    assert spelled(107) == "1 0 7" and spelled(7) == "7"
    assert sum_question("text_sum", 47, 35) == ("what is 4 7 plus 3 5?", "8 2")
    assert sum_question("text_max", 47, 82) == ("which is larger, 4 7 or 8 2?", "8 2")
    with pytest.raises(ValueError, match="two different numbers"):
        sum_question("text_max", 11, 11)


def test_no_sums_test_or_validation_question_occurs_in_training(tmp_path):
    manifest = generate_digits_dataset(tmp_path, seed=0, language="sums")
    assert manifest["language"] == "sums" and manifest["language_test_seen_in_train"] == 0.0
    splits = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    questions = {s: [r["conversations"][0]["value"] for r in rs if "image" not in r] for s, rs in splits.items()}
    assert not set(questions["test"]) & set(questions["train"])
    assert not set(questions["val"]) & set(questions["train"]) and not set(questions["val"]) & set(questions["test"])
    for split, count in SUM_COUNTS.items():
        tasks = [r["task"] for r in splits[split] if "image" not in r]
        assert all(tasks.count(t) == count for t in SUM_TASKS)
    # the multimodal side is the words set's (the same questions on the same images; shuffled among other
    # language questions, so in another order)
    words = generate_digits_dataset(tmp_path / "words", seed=0)
    assert words.get("language") is None

    def multimodal(records):
        return sorted((r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"])
                      for r in records if "image" in r)

    assert multimodal(splits["train"]) == multimodal(json.loads((tmp_path / "words" / "train.json").read_text()))


def _samples(n_image: int, n_text: int) -> list[Sample]:
    from pathlib import Path

    out = [Sample(f"i{i}", "q", "a", Path(f"images/{i:04d}.png"), "digit_name") for i in range(n_image)]
    out += [Sample(f"t{i}", "q", "a", None, "text_sum") for i in range(n_text)]
    return out


def test_the_text_share_keeps_that_share_of_language_only_conversations():
    samples = _samples(95, 400)
    mixed = with_text_share(samples, 0.05, seed=3)
    text = [s for s in mixed if s.image_path is None]
    assert len(text) == 5 and len(mixed) == 100
    assert mixed == [s for s in samples if s in mixed]                # order kept
    assert with_text_share(samples, 0.05, seed=3) == mixed            # seeded
    assert with_text_share(samples, 0.05, seed=4) != mixed
    assert with_text_share(samples, None, seed=3) == samples
    assert len(with_text_share(_samples(10, 2), 0.5, seed=0)) == 12   # fewer than asked: all of them


def test_language_only_selects_every_conversation_without_an_image(tmp_path):
    samples = _samples(3, 4)
    assert [s.id for s in select_tasks(samples, (LANGUAGE_ONLY,), tmp_path, "train")] == ["t0", "t1", "t2", "t3"]


def test_report_only_tables_the_finished_runs_and_runs_nothing(tmp_path, capsys):
    """`--report-only` while a comparison still runs: the pipelines whose stage III finished are tabled (paired
    over the seeds both settings have), the others listed as not yet; no training and no MLflow store."""
    from ds_smoes.app.compare import main
    from ds_smoes.app.pipeline import stage_dirs
    from ds_smoes.app.pipeline_config import load_pipeline_config

    config = "configs/recipe/evidence32.yaml"
    finished = {("topk", 0): 0.90, ("topk", 1): 0.92, ("smoes", 0): 0.93, ("smoes", 1): 0.94}
    for (gate, seed), mm in finished.items():
        dirs = stage_dirs(load_pipeline_config(config, [f"seed={seed}", f"variant={gate}", f"out_dir={tmp_path}"]))
        for stage, figures in (("dense", _run(0.9, 0.80, 0.0)), ("moe", _run(mm, 0.70, 0.0))):
            dirs[stage].mkdir(parents=True, exist_ok=True)
            (dirs[stage] / "metrics.json").write_text(json.dumps(figures))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--suite", "recipe", "--config", config, "--out", str(tmp_path), "--variants", "topk", "smoes",
                 "--seeds", "0", "1", "2", "--tracking-uri", uri, "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "4/6 runs finished" in out and "not yet: topk seed 2, smoes seed 2" in out
    table = (tmp_path / "recipe" / "table.md").read_text()
    (smoes,) = [line for line in table.splitlines() if line.startswith("| smoes |")]
    assert "| 0,1 |" in smoes and "+2.5 [" in smoes   # paired: (3 + 2) / 2 points over seeds 0 and 1
    assert (tmp_path / "recipe" / "accuracy_vs_bytes_per_sample.png").is_file()
    assert not (tmp_path / "mlflow.db").exists()
    assert main(["--suite", "gates", "--report-only"]) == 2
