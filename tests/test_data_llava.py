"""Tests for the LLaVA conversation loader and image loading (ds_smoes.data.llava)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ds_smoes.data import Sample, load_image, load_llava_json
from ds_smoes.core.errors import DatasetError, SMoESError



def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": role, "value": value} for role, value in pairs]


def qa(question: str = "what is one plus one?", answer: str = "two") -> list[dict[str, str]]:
    return turns(("human", question), ("gpt", answer))


def write_json(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def test_loads_generated_digits(digits_dir: Path) -> None:
    samples = load_llava_json(digits_dir / "test.json", digits_dir)
    raw = json.loads((digits_dir / "test.json").read_text())
    assert len(samples) == len(raw) == 759
    for sample, record in zip(samples, raw):
        assert sample.id == record["id"]
        assert sample.task == record["task"]
        assert sample.answer == record["conversations"][1]["value"]
        assert "<image>" not in sample.prompt and sample.prompt == sample.prompt.strip()
        if "image" in record:
            assert sample.image_path == digits_dir / record["image"]
            assert sample.prompt == record["conversations"][0]["value"].removeprefix("<image>\n")
        else:
            assert sample.image_path is None
            assert sample.prompt == record["conversations"][0]["value"]


def test_sample_fields_and_placeholder_stripping(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    records = [
        {"id": "x", "image": "a.png", "conversations": qa("<image>\n which digit is this?", " seven \n"), "task": "t"},
        {"id": 7, "image": "a.png", "conversations": qa("describe\n<image>\nplease", "ok")},
        {"conversations": qa()},
        {
            "id": "multi",
            "conversations": turns(("human", "hi"), ("gpt", "hello"), ("human", "what is two?"), ("gpt", "two")),
        },
    ]
    samples = load_llava_json(write_json(tmp_path / "d.json", records), tmp_path)
    assert samples[0] == Sample("x", "which digit is this?", "seven", tmp_path / "a.png", "t")
    assert samples[1].id == "7" and samples[1].prompt == "describe please" and samples[1].task is None
    assert samples[2] == Sample("2", "what is one plus one?", "two", None, None)  # missing id -> index
    assert samples[3].prompt == "hi\nhello\nwhat is two?" and samples[3].answer == "two"


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"id": "a", "conversations": qa()}), "", json.dumps({"conversations": qa()})]
    path.write_text("\n".join(lines) + "\n")
    samples = load_llava_json(path, tmp_path)
    assert [s.id for s in samples] == ["a", "1"]


def test_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": "a",\n  "conversations": [}\n]\n')
    with pytest.raises(DatasetError, match=r"bad\.json: invalid JSON at line 3, column 21"):
        load_llava_json(path, tmp_path)


def test_truncated_json_says_so_and_keeps_the_position(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "wha')
    with pytest.raises(DatasetError) as err:
        load_llava_json(path, tmp_path)
    assert ("cut.json: invalid JSON at line 1, column 59: Unterminated string (the text ends early: is the file "
            "truncated?) -- fix the file") in str(err.value)
    path.write_text('[{"id": "a",, "conversations": []}]')   # a mistake in the middle is not called truncation
    with pytest.raises(DatasetError) as err:
        load_llava_json(path, tmp_path)
    assert "column 13: Expecting property name enclosed in double quotes -- fix" in str(err.value)


def test_malformed_jsonl_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": qa()}) + "\n" + '{"conversations": \n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl: invalid JSON at line 2"):
        load_llava_json(path, tmp_path)


def test_missing_image(tmp_path: Path) -> None:
    records = [
        {"id": "ok", "conversations": qa()},
        {"id": "x", "image": "images/9.png", "conversations": qa("<image>\nq")},
    ]
    path = write_json(tmp_path / "train.json", records)
    with pytest.raises(DatasetError) as info:
        load_llava_json(path, tmp_path / "data")
    message = str(info.value)
    assert message == (
        f"{path}: record 1 (id 'x'): image 'images/9.png' not found under '{tmp_path / 'data'}' "
        "-- check data.image_folder or the record's \"image\" field"
    )


def test_placeholder_without_image_field(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [{"id": "p", "conversations": qa("<image>\nwhich digit is this?")}])
    expected = r"d\.json: record 0 \(id 'p'\): text contains \"<image>\" but the record has no \"image\" field"
    with pytest.raises(DatasetError, match=expected):
        load_llava_json(path, tmp_path)


@pytest.mark.parametrize("content", ["", "  \n", "[]"])
def test_empty_file_or_list(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=r"d\.json: (file is empty|contains no records)"):
        load_llava_json(path, tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        load_llava_json(tmp_path / "nope.json", tmp_path)


def test_top_level_must_be_list(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"conversations": qa()})
    with pytest.raises(DatasetError, match="top level is a JSON dict, expected a list"):
        load_llava_json(path, tmp_path)


@pytest.mark.parametrize(
    ("conversations", "expected"),
    [
        (turns(("gpt", "a"), ("human", "b")), r"turn 0 has \"from\": 'gpt', expected 'human'"),
        (turns(("human", "a"), ("human", "b")), r"turn 1 has \"from\": 'human', expected 'gpt'"),
        (turns(("user", "a"), ("assistant", "b")), r"turn 0 has \"from\": 'user', expected 'human'"),
        (turns(("human", "a"), ("gpt", "b"), ("human", "c")), r"conversation ends with a \"human\" turn"),
        (turns(("human", "a"), ("gpt", "  ")), r"the last \"gpt\" turn is empty"),
        ([], r"\"conversations\" is missing or not a non-empty list"),
        ([{"from": "human", "value": 3}], r"turn 0 must be an object with a string \"value\""),
        (None, r"\"conversations\" is missing or not a non-empty list"),
    ],
)
def test_bad_conversations(tmp_path: Path, conversations: object, expected: str) -> None:
    records = [{"id": "good", "conversations": qa()}, {"id": "bad", "conversations": conversations}]
    path = write_json(tmp_path / "d.json", records)
    with pytest.raises(DatasetError, match=r"d\.json: record 1 \(id 'bad'\): " + expected):
        load_llava_json(path, tmp_path)


def test_errors_are_smoes_errors() -> None:
    assert issubclass(DatasetError, SMoESError)


def test_load_image_resizes_and_normalizes(tmp_path: Path) -> None:
    pixels = np.full((16, 12, 3), 255, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "white.png")
    image_CHW = load_image(tmp_path / "white.png", 8)
    assert image_CHW.shape == (1, 8, 8) and image_CHW.dtype == torch.float32
    assert torch.allclose(image_CHW, torch.ones(1, 8, 8))
    Image.new("L", (4, 4), color=51).save(tmp_path / "grey.png")
    assert torch.allclose(load_image(tmp_path / "grey.png", 4), torch.full((1, 4, 4), 0.2))


def test_load_image_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really an image")
    with pytest.raises(DatasetError, match=r"broken\.png: cannot read image"):
        load_image(path, 8)
    with pytest.raises(DatasetError, match=r"missing\.png: image file not found"):
        load_image(tmp_path / "missing.png", 8)
