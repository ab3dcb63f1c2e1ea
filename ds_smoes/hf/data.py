"""LLaVA-format conversations for a Hugging Face VLM: its chat template, tokenizer and image processor.

A record (ds_smoes.data.llava) becomes the chat
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
rendered with the model's chat template (the processor's, else the tokenizer's; without one, a plain
"prompt\\nanswer<eos>" format).  Each image placeholder in the rendered text is expanded to as many
placeholder tokens as the image yields (`ModelAdapter.image_tokens`, the processor's own rule), and the
images go through the model's image processor.  Only the answer (and what the template puts after
it, e.g. <|im_end|>) is trained: labels are -100 on the prompt.

The processor's components are used rather than `processor(...)` itself, because some processors
cannot be built without optional packages (Qwen3VLProcessor needs torchvision for its video part).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ds_smoes.data.llava import Sample, SampleDataset
from ds_smoes.core.errors import ConfigError, DatasetError
from ds_smoes.hf.adapters.base import ModelAdapter

IGNORE_INDEX = -100


@dataclass
class VLMTextCodec:
    """Tokenizer + chat template + image processor of one model."""
    tokenizer: Any
    image_processor: Any
    chat_template: str | None
    config: Any
    adapter: ModelAdapter
    image_size: int | None = None   # resize images to this square first (None: the image processor decides)

    @classmethod
    def load(cls, path: Path, config, adapter: ModelAdapter, image_size: int | None = None) -> "VLMTextCodec":
        """From a directory holding the processor's files (tokenizer, preprocessor_config.json, chat template)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"no tokenizer in {path} ({err}): save the model's processor or tokenizer there "
                              "(processor.save_pretrained(dir)) or point hf.processor at one") from None
        try:
            image_processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"no image processor in {path} ({err}): save the model's processor there "
                              "(processor.save_pretrained(dir)) or point hf.processor at one") from None
        template = _processor_chat_template(path) or getattr(tokenizer, "chat_template", None)
        return cls(tokenizer, image_processor, template, config, adapter, image_size)

    @property
    def image_text(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(self.adapter.placeholder_ids(self.config)[0]))

    def render(self, prompt: str, answer: str | None, has_image: bool) -> str:
        """The conversation as text, through the end of the answer, or ready for generation (answer None)."""
        if self.chat_template is None:
            text = (f"{self.image_text}\n" if has_image else "") + prompt + "\n"
            return text if answer is None else text + answer + (self.tokenizer.eos_token or "")
        user = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=answer is None)

    def load_image(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read image ({exc}) -- replace or remove it") from exc
        if self.image_size:
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return img

    def encode(self, sample: Sample, with_answer: bool = True) -> dict[str, torch.Tensor]:
        """One sample: input_ids [T], attention_mask [T], labels [T] and the image processor's tensors."""
        has_image = sample.image_path is not None
        image_inputs = {}
        if has_image:
            image_inputs = dict(self.image_processor(images=[self.load_image(sample.image_path)], return_tensors="pt"))
        prompt_ids = self._ids(self.render(sample.prompt, None, has_image), image_inputs)
        if not with_answer:
            ids = prompt_ids
        else:
            ids = self._ids(self.render(sample.prompt, sample.answer, has_image), image_inputs)
            if ids[:len(prompt_ids)] != prompt_ids:
                raise DatasetError(f"sample {sample.id!r}: the chat template renders the prompt differently with and "
                                   "without the answer, so the answer tokens cannot be located")
        labels = list(ids) if with_answer else [IGNORE_INDEX] * len(ids)
        labels[:len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(labels), **image_inputs}

    def _ids(self, text: str, image_inputs: dict) -> list[int]:
        pieces = text.split(self.image_text)
        n_images = len(pieces) - 1
        expected = 0 if not image_inputs else _num_images(image_inputs)
        if n_images != expected:
            raise DatasetError(f"the rendered text has {n_images} image placeholders for {expected} images; the chat "
                               "template must emit one per {'type': 'image'} item")
        out = pieces[0]
        for i, piece in enumerate(pieces[1:]):
            out += self.image_text * self.adapter.image_tokens(self.config, image_inputs, i) + piece
        return self.tokenizer(out, add_special_tokens=False)["input_ids"]


def _num_images(image_inputs: dict) -> int:
    if "image_grid_thw" in image_inputs:
        return int(image_inputs["image_grid_thw"].shape[0])
    return int(image_inputs["pixel_values"].shape[0])


def _processor_chat_template(path: Path) -> str | None:
    """The processor's chat template file, if the directory has one (chat_template.jinja / .json)."""
    import json

    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


class HFConversationDataset(SampleDataset):
    """Encoded samples (computed once, lazily); `len`, `is_multimodal(i)` and `answer(i)` from SampleDataset."""

    def __init__(self, samples: Sequence[Sample], codec: VLMTextCodec) -> None:
        self.samples, self.codec = list(samples), codec
        self._cache: dict[tuple[int, bool], dict] = {}

    def item(self, i: int, with_answer: bool = True) -> dict:
        key = (i, with_answer)
        if key not in self._cache:
            self._cache[key] = self.codec.encode(self.samples[i], with_answer)
        return self._cache[key]

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


def collate(items: Sequence[dict], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad input_ids / attention_mask / labels (right, or left for generation); concatenate the image tensors
    of the samples that have them along dim 0 (the layout both LLaVA's and Qwen-VL's processors use)."""
    length = max(int(it["input_ids"].shape[0]) for it in items)
    batch = {"input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
             "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)}
    for b, it in enumerate(items):
        n = int(it["input_ids"].shape[0])
        sl = slice(length - n, length) if left else slice(0, n)
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key][b, sl] = it[key]
    image_keys = sorted({k for it in items for k in it if k not in batch})
    for key in image_keys:
        batch[key] = torch.cat([it[key] for it in items if key in it])
    return batch
