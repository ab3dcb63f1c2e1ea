"""The digits' canvas variant (issue 19: data where visual token compression matters), and the guarantee that
the plain digits stay byte for byte what they were (the demo's published figures depend on them)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from ds_smoes.app.config import DataConfig, load_train_config
from ds_smoes.app.family import check_digits_variant
from ds_smoes.core.errors import ConfigError
from ds_smoes.data import WordTokenizer, generate_digits_dataset
from ds_smoes.data.digits import (CANVAS_GRID, CANVAS_NOISE_MAX, IMAGE_SIZE, LOCATIONS, NUMBER_WORDS, canvas_layout,
                                  check_canvas_size, main, multimodal_question)

SPLITS = ("train", "val", "test")
CANVAS = 32
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "canvas.yaml"

# sha256 of the plain seed-0 set as the generator wrote it before the canvas variant existed
PLAIN_SHA256 = {
    "train.json": "1da67b509480a9745f8eac0fd9287b98edf524aa36c3b2c18888d27dce66befc",
    "val.json": "901f61b7cba71359109fc427ab4d91f0897d96c3085e034b0cf8f35089a7ae10",
    "test.json": "b4432b9c9bf0c4c6b0556c5d800d271d70534b5fdac51a02e79b8ec2c525bda1",
    "manifest.json": "8c6782b2f7addd708745de1cf31f456e201205338c294ca5112c7f82e7ba7d87",
    "images/0000.png": "f422f254bff3efcd48f684dd39d678994a15f1127dbcb0e44341a48b30c6086f",
    "images/1796.png": "da67d521d6a6ed0eeadbec040f1b58b14abc457f09c6a4b12f40ea8c5ae764dc",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(out_dir: Path, split: str) -> list[dict]:
    return json.loads((out_dir / f"{split}.json").read_text())


def image_index(record: dict) -> int:
    return int(re.fullmatch(r"images/(\d{4})\.png", record["image"]).group(1))


@pytest.fixture(scope="module")
def canvas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("digits_canvas32")
    generate_digits_dataset(out_dir, seed=0, canvas_size=CANVAS)
    return out_dir


def test_plain_digits_are_unchanged(digits_dir: Path) -> None:
    assert {name: sha256(digits_dir / name) for name in PLAIN_SHA256} == PLAIN_SHA256
    assert "canvas_size" not in json.loads((digits_dir / "manifest.json").read_text())


def test_manifest_records_the_variant(canvas_dir: Path, digits_dir: Path) -> None:
    manifest = json.loads((canvas_dir / "manifest.json").read_text())
    assert manifest["variant"] == "canvas" and manifest["canvas_size"] == CANVAS == manifest["image_size"]
    assert manifest["locations"] == list(LOCATIONS) and manifest["noise_max"] == CANVAS_NOISE_MAX
    assert sum(manifest["image_locations"].values()) == manifest["num_images"] == 1797
    plain = json.loads((digits_dir / "manifest.json").read_text())
    for split in SPLITS:  # the plain set's sizes, so a CPU run trains on as many conversations
        got, want = manifest["splits"][split], plain["splits"][split]
        assert (got["records"], got["images"], got["language"]) == (want["records"], want["images"], want["language"])
        assert got["tasks"]["digit_where"] > 0
    assert manifest["splits"]["train"]["tasks"]["digit_where"] > 0.2 * manifest["splits"]["train"]["multimodal"]


def test_same_seed_gives_identical_bytes(canvas_dir: Path, tmp_path: Path) -> None:
    generate_digits_dataset(tmp_path, seed=0, canvas_size=CANVAS)
    names = [p.relative_to(canvas_dir) for p in sorted(canvas_dir.rglob("*")) if p.is_file()]
    assert len(names) == 1797 + 4
    for name in names:
        assert (tmp_path / name).read_bytes() == (canvas_dir / name).read_bytes(), name


def test_images_place_the_digit_where_the_answer_says(canvas_dir: Path) -> None:
    digits = load_digits()
    layout = canvas_layout(1797, CANVAS, seed=0)
    half = CANVAS // 2
    where_records = [r for s in SPLITS for r in read_split(canvas_dir, s) if r["task"] == "digit_where"]
    assert len(where_records) > 300
    for record in where_records:
        index = image_index(record)
        answer = record["conversations"][1]["value"]
        assert record["conversations"][0]["value"] == "<image>\nwhere is the digit?"
        pixels_HW = np.asarray(Image.open(canvas_dir / record["image"]))
        assert pixels_HW.shape == (CANVAS, CANVAS) and pixels_HW.dtype == np.uint8
        row, col, where = layout[index]
        assert where == answer
        assert row % CANVAS_GRID == 0 and col % CANVAS_GRID == 0  # on the patch grid: exactly 2x2 patches
        # the whole 8x8 digit box lies inside the canvas, in the quadrant the answer names
        q_row, q_col = divmod(LOCATIONS.index(answer), 2)
        assert q_row * half <= row and row + IMAGE_SIZE <= (q_row + 1) * half
        assert q_col * half <= col and col + IMAGE_SIZE <= (q_col + 1) * half
        # read from the image alone: every pixel brighter than the noise is in that box, and the digit is there
        ys, xs = np.nonzero(pixels_HW > CANVAS_NOISE_MAX)
        assert ys.min() >= row and ys.max() < row + IMAGE_SIZE and xs.min() >= col and xs.max() < col + IMAGE_SIZE
        digit_HW = np.rint(digits.images[index] * 255.0 / 16.0).astype(np.uint8)
        box_HW = pixels_HW[row:row + IMAGE_SIZE, col:col + IMAGE_SIZE]
        bright = digit_HW > CANVAS_NOISE_MAX
        assert np.array_equal(box_HW[bright], digit_HW[bright])
        assert pixels_HW.max() > 200  # readable: strokes stand far above the noise


def test_noise_is_low_and_seeded(canvas_dir: Path) -> None:
    layout = canvas_layout(1797, CANVAS, seed=0)
    for index in (0, 1, 900):
        pixels_HW = np.asarray(Image.open(canvas_dir / f"images/{index:04d}.png")).copy()
        row, col, _ = layout[index]
        pixels_HW[row:row + IMAGE_SIZE, col:col + IMAGE_SIZE] = 0
        assert pixels_HW.max() <= CANVAS_NOISE_MAX and pixels_HW.std() > 5  # noise, not a blank background
    assert canvas_layout(50, CANVAS, seed=1) != canvas_layout(50, CANVAS, seed=0)
    places = {(row, col) for row, col, _ in canvas_layout(1797, CANVAS, seed=0)}
    assert len(places) == 36  # 3x3 grid places in each quadrant, all used
    assert len({(r, c) for r, c, _ in canvas_layout(1797, 48, seed=0)}) == 100


def test_identity_answers_and_one_token_answers(canvas_dir: Path) -> None:
    labels = load_digits().target
    records = [r for s in SPLITS for r in read_split(canvas_dir, s)]
    assert {r["task"] for r in records if "image" in r} == {"digit_name", "digit_even", "digit_plus", "digit_where"}
    for record in records:
        if record["task"] in ("digit_name", "digit_even"):
            question, answer = multimodal_question(record["task"], int(labels[image_index(record)]))
            assert record["conversations"][0]["value"] == f"<image>\n{question}"
            assert record["conversations"][1]["value"] == answer
        elif record["task"] == "digit_plus":
            addend = NUMBER_WORDS.index(record["conversations"][0]["value"].split()[-1].rstrip("?"))
            assert record["conversations"][1]["value"] == NUMBER_WORDS[int(labels[image_index(record)]) + addend]
    train = read_split(canvas_dir, "train")
    tok = WordTokenizer.build(t["value"] for r in train for t in r["conversations"])
    for where in LOCATIONS:
        assert len(tok.encode(where)) == 1 and tok.encode(where) != [tok.unk_id]
    assert train[0]["id"] == "digits-canvas32-train-00000"


def test_reuse_only_for_the_same_variant(canvas_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("train.json", "val.json", "test.json", "manifest.json"):
        shutil.copy(canvas_dir / name, tmp_path / name)
    manifest = json.loads((canvas_dir / "manifest.json").read_text())
    assert generate_digits_dataset(tmp_path, seed=0, canvas_size=CANVAS) == manifest  # reused, nothing written

    class Regenerating(Exception):
        pass

    def refuse():
        raise Regenerating

    monkeypatch.setattr("sklearn.datasets.load_digits", refuse)
    for other in (None, 48):  # another variant in the same folder is regenerated, not reused
        with pytest.raises(Regenerating):
            generate_digits_dataset(tmp_path, seed=0, canvas_size=other)


@pytest.mark.parametrize("bad", [8, 15, 33, 36, True, 32.0])
def test_bad_canvas_sizes(bad) -> None:
    with pytest.raises(ValueError, match="canvas size"):
        check_canvas_size(bad)
    with pytest.raises(ValueError, match="canvas size"):
        generate_digits_dataset(Path("unused"), canvas_size=bad)


def test_cli(canvas_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(canvas_dir), "--canvas-size", str(CANVAS)]) == 0
    assert "32x32 noisy canvas" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(canvas_dir), "--canvas-size", "7"])
    assert exit_info.value.code == 2


def test_canvas_config_loads() -> None:
    cfg = load_train_config(CONFIG)
    assert cfg.data.canvas_size == cfg.model.image_size == CANVAS
    assert cfg.model.num_patches == 64 and cfg.model.max_len >= 80
    assert cfg.data.image_folder.name == "digits_canvas32" and cfg.run.output_dir.name == "canvas"


def test_config_refuses_a_canvas_the_model_does_not_see() -> None:
    with pytest.raises(ConfigError, match=r"data.canvas_size=32 but model.image_size=8.*--set model.image_size=32"):
        load_train_config(CONFIG, ["model.image_size=8", "model.patch_size=4"])
    with pytest.raises(ConfigError, match="canvas size must be a multiple of 8"):
        load_train_config(None, ["data.canvas_size=31"])


def test_data_prep_refuses_another_variant(canvas_dir: Path, digits_dir: Path) -> None:
    def data(folder: Path, canvas: int | None) -> DataConfig:
        return DataConfig(image_folder=folder, canvas_size=canvas)

    check_digits_variant(data(canvas_dir, CANVAS), CANVAS)
    check_digits_variant(data(digits_dir, None), 8)
    check_digits_variant(data(digits_dir, None), 16)  # plain digits may be resized, as before
    with pytest.raises(ConfigError, match=r"32x32 canvas but model.image_size=8.*--set model.image_size=32"):
        check_digits_variant(data(canvas_dir, None), 8)
    with pytest.raises(ConfigError, match=r"data.canvas_size=32 but .* holds the plain 8x8 digits.*--canvas-size 32"):
        check_digits_variant(data(digits_dir, CANVAS), CANVAS)
    with pytest.raises(ConfigError, match="holds the 32x32 canvas variant"):
        check_digits_variant(data(canvas_dir, 48), 48)


def test_prepare_data_gives_64_image_tokens(canvas_dir: Path) -> None:
    from ds_smoes.app.builtin import prepare_data

    paths = {f"data.{s}_json": str(canvas_dir / f"{s}.json") for s in SPLITS}
    cfg = load_train_config(CONFIG, [f"{k}={v}" for k, v in paths.items()] + [f"data.image_folder={canvas_dir}"])
    sets = prepare_data(cfg, log=lambda line: None)
    assert sets.train.num_patches == 64 and len(sets.train) == 4916
    assert max(ds.max_seq_len for ds in (sets.train, sets.val, sets.test)) <= cfg.model.max_len
    item = next(sets.test[i] for i in range(len(sets.test)) if sets.test.is_multimodal(i))
    assert item["num_image_tokens"] == 64 and tuple(item["image_CHW"].shape) == (1, CANVAS, CANVAS)
