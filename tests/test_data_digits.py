"""Tests for the digits dataset generator (ds_smoes.data.digits)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from ds_smoes.data import generate_digits_dataset, load_image
from ds_smoes.data.digits import GENERATOR_VERSION, NUMBER_WORDS, main

SPLITS = ("train", "val", "test")
WORD_TO_INT = {word: i for i, word in enumerate(NUMBER_WORDS)}



@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits().target


def read_split(out_dir: Path, split: str) -> list[dict]:
    return json.loads((out_dir / f"{split}.json").read_text())


def image_index(record: dict) -> int:
    match = re.fullmatch(r"images/(\d{4})\.png", record["image"])
    assert match, record["image"]
    return int(match.group(1))


def question(record: dict) -> str:
    return record["conversations"][0]["value"]


def answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def test_manifest_counts(digits_dir: Path) -> None:
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["version"] == GENERATOR_VERSION
    images = {s: manifest["splits"][s]["images"] for s in SPLITS}
    assert images == {"train": 1258, "val": 180, "test": 359}
    assert sum(images.values()) == 1797
    language = {s: manifest["splits"][s]["language"] for s in SPLITS}
    assert language == {"train": 2400, "val": 200, "test": 400}
    assert manifest["splits"]["train"]["multimodal"] == 2 * 1258
    assert manifest["splits"]["val"]["multimodal"] == 180
    assert manifest["splits"]["test"]["multimodal"] == 359
    for split in SPLITS:
        records = read_split(digits_dir, split)
        stats = manifest["splits"][split]
        assert stats["records"] == len(records)
        assert stats["tasks"] == dict(Counter(r["task"] for r in records))


def test_record_format(digits_dir: Path) -> None:
    for split in SPLITS:
        for i, record in enumerate(read_split(digits_dir, split)):
            assert record["id"] == f"digits-{split}-{i:05d}"
            human, gpt = record["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert gpt["value"] == gpt["value"].lower().strip() and " " not in gpt["value"]
            if "image" in record:
                assert list(record) == ["id", "image", "conversations", "task"]
                assert human["value"].startswith("<image>\n")
                assert human["value"].count("<image>") == 1
            else:
                assert list(record) == ["id", "conversations", "task"]
                assert "<image>" not in human["value"]
    raw = (digits_dir / "train.json").read_text()
    assert raw.startswith('[\n {\n  "id": "digits-train-00000"')  # indent=1


def test_image_splits_are_disjoint_and_cover_all(digits_dir: Path) -> None:
    per_split = {s: {image_index(r) for r in read_split(digits_dir, s) if "image" in r} for s in SPLITS}
    assert not per_split["train"] & per_split["val"]
    assert not per_split["train"] & per_split["test"]
    assert not per_split["val"] & per_split["test"]
    assert per_split["train"] | per_split["val"] | per_split["test"] == set(range(1797))


def test_train_has_two_different_templates_per_image(digits_dir: Path) -> None:
    tasks_per_image: dict[int, list[str]] = {}
    for record in read_split(digits_dir, "train"):
        if "image" in record:
            tasks_per_image.setdefault(image_index(record), []).append(record["task"])
    assert len(tasks_per_image) == 1258
    assert all(len(tasks) == 2 and len(set(tasks)) == 2 for tasks in tasks_per_image.values())
    for split in ("val", "test"):
        counts = Counter(image_index(r) for r in read_split(digits_dir, split) if "image" in r)
        assert set(counts.values()) == {1}


def check_multimodal(record: dict, label: int) -> None:
    q, a = question(record), answer(record)
    if record["task"] == "digit_name":
        assert q == "<image>\nwhich digit is this?"
        assert a == NUMBER_WORDS[label]
    elif record["task"] == "digit_even":
        assert q == "<image>\nis this digit even?"
        assert a == ("yes" if label % 2 == 0 else "no")
    elif record["task"] == "digit_plus":
        match = re.fullmatch(r"<image>\nwhat is this digit plus (one|two|three)\?", q)
        assert match, q
        assert a == NUMBER_WORDS[label + WORD_TO_INT[match.group(1)]]
    else:
        raise AssertionError(f"unexpected multimodal task {record['task']}")


def test_multimodal_answers_match_sklearn_labels(digits_dir: Path, labels: np.ndarray) -> None:
    test_records = [r for r in read_split(digits_dir, "test") if "image" in r]
    assert len(test_records) == 359
    for record in test_records:
        check_multimodal(record, int(labels[image_index(record)]))
    assert {r["task"] for r in test_records} == {"digit_name", "digit_even", "digit_plus"}
    for record in read_split(digits_dir, "train")[:300]:
        if "image" in record:
            check_multimodal(record, int(labels[image_index(record)]))


def test_hand_checked_records(digits_dir: Path, labels: np.ndarray) -> None:
    # Pinned seed-0 records (a change here means seed 0 no longer reproduces the same data).
    train = read_split(digits_dir, "train")
    assert train[0]["conversations"] == [
        {"from": "human", "value": "is seven greater than two?"},
        {"from": "gpt", "value": "yes"},
    ]
    assert train[1]["image"] == "images/0927.png" and int(labels[927]) == 2
    assert train[1]["conversations"][1]["value"] == "two"
    from ds_smoes.data.digits import language_question, multimodal_question

    assert multimodal_question("digit_name", 7) == ("which digit is this?", "seven")
    assert multimodal_question("digit_even", 7) == ("is this digit even?", "no")
    assert multimodal_question("digit_plus", 9, 3) == ("what is this digit plus three?", "twelve")
    assert language_question("text_plus", 9, 9) == ("what is nine plus nine?", "eighteen")
    assert language_question("text_minus", 7, 2) == ("what is seven minus two?", "five")
    assert language_question("text_greater", 4, 4) == ("is four greater than four?", "no")
    assert language_question("text_larger", 3, 8) == ("which is larger, three or eight?", "eight")


def test_language_answers_are_correct(digits_dir: Path) -> None:
    patterns = {
        "text_plus": (r"what is (\w+) plus (\w+)\?", lambda a, b: NUMBER_WORDS[a + b]),
        "text_minus": (r"what is (\w+) minus (\w+)\?", lambda a, b: NUMBER_WORDS[a - b]),
        "text_greater": (r"is (\w+) greater than (\w+)\?", lambda a, b: "yes" if a > b else "no"),
        "text_larger": (r"which is larger, (\w+) or (\w+)\?", lambda a, b: NUMBER_WORDS[max(a, b)]),
    }
    for split in SPLITS:
        for record in read_split(digits_dir, split):
            if "image" in record:
                continue
            pattern, solve = patterns[record["task"]]
            match = re.fullmatch(pattern, question(record))
            assert match, question(record)
            a, b = WORD_TO_INT[match.group(1)], WORD_TO_INT[match.group(2)]
            assert a <= 9 and b <= 9
            if record["task"] == "text_minus":
                assert a >= b
            if record["task"] == "text_larger":
                assert a != b
            assert answer(record) == solve(a, b)


def test_language_seen_share_matches_manifest(digits_dir: Path) -> None:
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    train = {question(r) for r in read_split(digits_dir, "train") if "image" not in r}
    test = [question(r) for r in read_split(digits_dir, "test") if "image" not in r]
    share = sum(q in train for q in test) / len(test)
    assert manifest["language_test_seen_in_train"] == round(share, 4)


def test_all_images_exist_and_load(digits_dir: Path) -> None:
    images = load_digits().images
    for index in range(1797):
        path = digits_dir / "images" / f"{index:04d}.png"
        assert path.is_file()
    for index in range(0, 1797, 37):
        image_CHW = load_image(digits_dir / "images" / f"{index:04d}.png", 8)
        assert image_CHW.shape == (1, 8, 8) and image_CHW.dtype.is_floating_point
        assert 0.0 <= float(image_CHW.min()) and float(image_CHW.max()) <= 1.0
        np.testing.assert_allclose(image_CHW[0].numpy() * 16.0, images[index], atol=16.0 / 255.0)


def test_same_seed_gives_identical_bytes(digits_dir: Path, tmp_path: Path) -> None:
    generate_digits_dataset(tmp_path, seed=0)
    for name in ("train.json", "val.json", "test.json", "manifest.json", "images/0000.png", "images/1796.png"):
        assert (tmp_path / name).read_bytes() == (digits_dir / name).read_bytes(), name


def test_different_seed_gives_different_data(digits_dir: Path, tmp_path: Path) -> None:
    manifest = generate_digits_dataset(tmp_path, seed=1)
    assert manifest["seed"] == 1
    for split in SPLITS:
        assert (tmp_path / f"{split}.json").read_bytes() != (digits_dir / f"{split}.json").read_bytes()
    test_images_0 = {r["image"] for r in read_split(digits_dir, "test") if "image" in r}
    test_images_1 = {r["image"] for r in read_split(tmp_path, "test") if "image" in r}
    assert test_images_0 != test_images_1


def test_idempotent_and_force(digits_dir: Path, tmp_path: Path) -> None:
    first = generate_digits_dataset(tmp_path, seed=3)
    train_path = tmp_path / "train.json"
    train_path.write_text("[]")  # a reuse must not rewrite the files
    assert generate_digits_dataset(tmp_path, seed=3) == first
    assert train_path.read_text() == "[]"
    assert generate_digits_dataset(tmp_path, seed=3, force=True) == first
    assert train_path.read_text() != "[]"
    assert generate_digits_dataset(tmp_path, seed=4)["seed"] == 4  # another seed regenerates


def test_cli_prints_summary(digits_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(digits_dir)]) == 0
    out = capsys.readouterr().out
    assert "train 4916 records" in out and "val 380 records" in out and "test 759 records" in out
    assert str(digits_dir) in out
