"""LLaVA-format data through a model's chat template, tokenizer and image processor; the --hf-model config."""
import pytest

import hf_tiny
from ds_smoes.data import load_llava_json
from ds_smoes.core.errors import ConfigError
from ds_smoes.hf.adapters import model_adapter_for
from ds_smoes.app.hf_config import load_hf_train_config
from ds_smoes.hf.data import HFConversationDataset, VLMTextCodec, collate


@pytest.fixture()
def dataset(tmp_path):
    model_dir = hf_tiny.save_tiny_qwen3_vl_moe(tmp_path / "model")
    data_json = hf_tiny.write_tiny_llava_data(tmp_path / "data", n=4)
    config = hf_tiny.qwen3_vl_moe_config()
    codec = VLMTextCodec.load(model_dir, config, model_adapter_for(config), image_size=16)
    return HFConversationDataset(load_llava_json(data_json, tmp_path / "data"), codec)


def test_chat_template_placeholders_and_answer_only_labels(dataset):
    tok = dataset.codec.tokenizer
    item = dataset[0]   # an image question: 16x16 image, 4x4 patches, 2x2 merge -> 4 placeholders
    ids = item["input_ids"].tolist()
    assert ids.count(hf_tiny.IMAGE_ID) == 4 and item["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert item["pixel_values"].shape == (16, 3 * 2 * 4 * 4)
    labelled = [t for t, l in zip(ids, item["labels"].tolist()) if l != -100]
    assert tok.decode(labelled) == dataset.answer(0) + " <|im_end|>"   # the answer and the template's end of turn
    text_item = dataset[1]
    assert hf_tiny.IMAGE_ID not in text_item["input_ids"].tolist() and "pixel_values" not in text_item
    prompt = dataset.item(0, with_answer=False)
    assert prompt["input_ids"].tolist() == ids[:len(prompt["input_ids"])]
    assert tok.decode(prompt["input_ids"][-2:]) == "<|im_start|> assistant"


def test_collate_pads_and_concatenates_image_tensors(dataset):
    items = [dataset[i] for i in range(4)]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 2 * 16
    assert batch["image_grid_thw"].shape == (2, 3)
    n1 = len(items[1]["input_ids"])
    assert batch["attention_mask"][1].sum() == n1 and (batch["labels"][1, n1:] == -100).all()
    left = collate(items, pad_id=0, left=True)
    assert left["attention_mask"][:, -1].all()


def test_hf_train_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hf: {processor: proc, image_size: 16}\nsmoes: {num_bins: 2}\n")
    cfg = load_hf_train_config(path, ["optim.max_steps=3"], "some/model")
    assert cfg.hf.model == "some/model" and cfg.hf.processor == (tmp_path / "proc").resolve()
    assert cfg.optim.max_steps == 3 and cfg.smoes.model_fields_set >= {"num_bins"}
    path.write_text("model: {d_model: 32}\n")
    with pytest.raises(ConfigError, match="remove it"):
        load_hf_train_config(path, [], "m")
    with pytest.raises(ConfigError, match="hf.mode"):
        load_hf_train_config(None, ["hf.mode=sideways"], "m")


def test_a_missing_hf_model_is_reported_as_not_found(tmp_path):
    from ds_smoes.core.errors import ConfigError
    from ds_smoes.hf.load import load_hf_model

    with pytest.raises(ConfigError, match=r"--hf-model .*nope: not found \(give a save_pretrained directory"):
        load_hf_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"expected a save_pretrained directory or a config \.json file"):
        load_hf_model(str(tmp_path / "weights.bin"))
