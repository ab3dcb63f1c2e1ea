"""Tests for the word tokenizer and batch collation (ds_smoes.data.tokenizer, ds_smoes.data.collate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ds_smoes.data import (
    IGNORE_INDEX,
    LlavaDataset,
    Sample,
    VLMBatch,
    WordTokenizer,
    collate_prompts,
    collate_train,
    load_image,
    load_llava_json,
)
from ds_smoes.core.errors import ConfigError, DatasetError

X = IGNORE_INDEX



@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    # Vocabulary: 6 specials, then sorted: ? digit five is plus seven this three two what which
    return WordTokenizer.build(["Which digit is this?", "seven", "what is two plus three?", "five"])


@pytest.fixture(scope="module")
def hand_dataset(digits_dir: Path, tokenizer: WordTokenizer) -> LlavaDataset:
    samples = [
        Sample("mm", "which digit is this?", "seven", digits_dir / "images/0007.png", "digit_name"),
        Sample("lang", "what is two plus three?", "five", None, "text_plus"),
        Sample("long", "what is two plus three plus two plus three?", "ten", None, "text_plus"),
    ]
    return LlavaDataset(samples, tokenizer, image_size=8, patch_size=4)  # 4 image tokens


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary(tokenizer: WordTokenizer) -> None:
    assert tokenizer.tokens == (
        "<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<sep>",
        "?", "digit", "five", "is", "plus", "seven", "this", "three", "two", "what", "which",
    )  # fmt: skip
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.unk_id, tokenizer.image_id, tokenizer.sep_id) == (3, 4, 5)
    assert tokenizer.vocab_size == len(tokenizer) == 17


def test_tokenizer_round_trip(tokenizer: WordTokenizer, tmp_path: Path) -> None:
    tok = WordTokenizer.build(["which is larger, three or five?", "what is seven minus two?"])
    for text in ["which is larger, three or five?", "what is seven minus two?", "five"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("WHICH is") == tok.encode("which is")
    assert tokenizer.encode("which banana?") == [16, tokenizer.unk_id, 6]
    assert tokenizer.decode([1, 16, 7, 3, 4, 5, 11, 2, 0, 999]) == "which digit seven"
    tok.save(tmp_path / "sub" / "tok.json")
    assert WordTokenizer.load(tmp_path / "sub" / "tok.json") == tok


def test_tokenizer_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="tokenizer file not found"):
        WordTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"tokens": ["a"]}')
    with pytest.raises(DatasetError, match="not a saved ds_smoes.WordTokenizer file"):
        WordTokenizer.load(tmp_path / "bad.json")


# ---------------------------------------------------------------- items and collate


def test_items(hand_dataset: LlavaDataset) -> None:
    assert hand_dataset.num_patches == 4 and len(hand_dataset) == 3
    assert hand_dataset.is_multimodal(0) and not hand_dataset.is_multimodal(1)
    assert hand_dataset.answer(1) == "five"
    item = hand_dataset[0]
    assert item["prompt_ids"] == [1, 4, 4, 4, 4, 16, 7, 9, 12, 6, 5]
    assert item["answer_ids"] == [11, 2]
    assert item["num_image_tokens"] == 4 and item["has_image"] and item["index"] == 0
    assert hand_dataset.image(0) is hand_dataset.image(0)  # cached
    assert hand_dataset.max_seq_len == 1 + 10 + 1 + 1 + 1  # the "long" language sample


def test_collate_train_hand_checked(hand_dataset: LlavaDataset, digits_dir: Path) -> None:
    batch = collate_train([hand_dataset[0], hand_dataset[1]])
    # <bos> <image>x4 which digit is this ? <sep> seven <eos>
    mm = [1, 4, 4, 4, 4, 16, 7, 9, 12, 6, 5, 11, 2]
    # <bos> what is two plus three ? <sep> five <eos> <pad>x3
    lang = [1, 15, 9, 14, 10, 13, 6, 5, 8, 2, 0, 0, 0]
    assert batch.input_ids_BT.tolist() == [mm, lang]
    assert batch.labels_BT.tolist() == [
        [X, X, X, X, X, X, X, X, X, X, X, 11, 2],
        [X, X, X, X, X, X, X, X, 8, 2, X, X, X],
    ]
    assert batch.attention_mask_BT.tolist() == [[True] * 13, [True] * 10 + [False] * 3]
    assert batch.modality_BT.tolist() == [[0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [0] * 13]
    assert batch.has_image_B.tolist() == [True, False]
    assert batch.sample_index_B.tolist() == [0, 1]
    assert batch.image_BCHW.shape == (2, 1, 8, 8) and batch.image_BCHW.dtype == torch.float32
    assert torch.equal(batch.image_BCHW[0], load_image(digits_dir / "images/0007.png", 8))
    assert torch.equal(batch.image_BCHW[1], torch.zeros(1, 8, 8))
    assert batch.input_ids_BT.dtype == batch.labels_BT.dtype == batch.modality_BT.dtype == torch.long
    assert batch.attention_mask_BT.dtype == batch.has_image_B.dtype == torch.bool


def test_collate_prompts_left_pads(hand_dataset: LlavaDataset) -> None:
    batch = collate_prompts([hand_dataset[1], hand_dataset[0], hand_dataset[2]])
    assert batch.input_ids_BT.tolist() == [
        [0, 0, 0, 0, 1, 15, 9, 14, 10, 13, 6, 5],
        [0, 1, 4, 4, 4, 4, 16, 7, 9, 12, 6, 5],
        [1, 15, 9, 14, 10, 13, 10, 14, 10, 13, 6, 5],
    ]
    assert batch.attention_mask_BT.tolist() == [[False] * 4 + [True] * 8, [False] + [True] * 11, [True] * 12]
    assert batch.modality_BT.tolist() == [[0] * 12, [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 12]
    assert (batch.labels_BT == IGNORE_INDEX).all()
    assert batch.has_image_B.tolist() == [False, True, False]
    assert batch.sample_index_B.tolist() == [1, 0, 2]


def test_batch_to(hand_dataset: LlavaDataset) -> None:
    batch = collate_train([hand_dataset[0]])
    moved = batch.to("cpu")
    assert isinstance(moved, VLMBatch) and moved is not batch
    assert torch.equal(moved.input_ids_BT, batch.input_ids_BT) and moved.batch_size == 1
    assert moved.seq_len == 13


def test_dataloader_on_digits(digits_dir: Path) -> None:
    samples = load_llava_json(digits_dir / "val.json", digits_dir)
    tokenizer = WordTokenizer.build(t for s in samples for t in (s.prompt, s.answer))
    dataset = LlavaDataset(samples, tokenizer, image_size=8, patch_size=2)
    assert dataset.num_patches == 16
    loader = DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=dataset.collate_train)
    seen = 0
    for batch in loader:
        B = batch.batch_size
        assert batch.image_BCHW.shape == (B, 1, 8, 8)
        assert (batch.modality_BT.sum(dim=1) == 16 * batch.has_image_B.long()).all()
        real_labels_BT = batch.labels_BT != IGNORE_INDEX
        assert torch.equal(batch.input_ids_BT[real_labels_BT], batch.labels_BT[real_labels_BT])
        assert not (real_labels_BT & ~batch.attention_mask_BT).any()
        for b, i in enumerate(batch.sample_index_B.tolist()):
            answer_ids = batch.labels_BT[b][real_labels_BT[b]].tolist()
            assert tokenizer.decode(answer_ids) == dataset.answer(i)
            assert answer_ids[-1] == tokenizer.eos_id
        seen += B
    assert seen == len(dataset)
    prompts = next(iter(DataLoader(dataset, batch_size=8, collate_fn=collate_prompts)))
    assert (prompts.input_ids_BT[:, -1] == tokenizer.sep_id).all()


def test_bad_patch_size(tokenizer: WordTokenizer) -> None:
    with pytest.raises(ConfigError, match="patch_size must be an integer in 1..image_size"):
        LlavaDataset([], tokenizer, image_size=8, patch_size=16)
    with pytest.raises(ConfigError, match="image_size must be a positive integer"):
        LlavaDataset([], tokenizer, image_size=0, patch_size=1)
