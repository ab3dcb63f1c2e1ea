"""Tokenized dataset and batch collation for a decoder with image patches spliced in.

One sample becomes the token sequence::

    <bos> <image> * image_tokens  prompt...  <sep>  answer...  <eos>
          (only with an image)

``image_tokens`` is ``num_patches`` unless the model compresses the vision tokens before the LLM
(``ModelConfig.compress.pre_llm_budget``): removed tokens get no placeholder, so the sequence is shorter.

The ``<image>`` positions are placeholders: the model replaces their embeddings with
the image's patch embeddings (``modality_BT == 1`` marks them). Labels are *not*
shifted here: ``labels_BT[b, t]`` is the target for ``input_ids_BT[b, t]`` itself, equal
to it on the answer tokens and the final ``<eos>`` and ``-100`` (ignored) elsewhere; the
model shifts (predicts position t+1 from position t).

Collation: :func:`collate_train` (right padding, with answers and labels) and
:func:`collate_prompts` (prompts only, left padding, for generation) are plain module
functions of one argument, so they can be passed directly as
``DataLoader(dataset, collate_fn=collate_train)``. They need no tokenizer because the
:class:`LlavaDataset` items carry everything (the pad id is fixed at 0). The same
functions are also reachable as ``LlavaDataset.collate_train`` / ``collate_prompts``.
Both check their items first, on the host, where it is cheap (plain ints and CPU tensors): an item
without tokens, image tokens (modality 1) that do not fit in its prompt, a negative sample index or an
image of another shape or with NaN/inf pixels raises :class:`~ds_smoes.core.errors.DatasetError`
naming the item, instead of a wrong batch or a crash inside the model.

No truncation is done; :attr:`LlavaDataset.max_seq_len` tells the longest sequence so
the model's context length can be checked up front.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ds_smoes.core.errors import ConfigError, DatasetError
from ds_smoes.data.llava import Sample, SampleDataset, load_image
from ds_smoes.data.tokenizer import WordTokenizer

IGNORE_INDEX = -100
"""Label value ignored by the loss (PyTorch's cross-entropy default)."""

MODALITY_TEXT = 0
MODALITY_VISION = 1

Item = dict[str, Any]


@dataclass
class VLMBatch:
    """A padded batch of B sequences of length T.

    Attributes:
        input_ids_BT: token ids (long), pad id 0 on padding.
        labels_BT: target of each position itself (unshifted), -100 where ignored (long).
        attention_mask_BT: True on real tokens, False on padding (bool).
        modality_BT: 1 on image-patch (``<image>``) positions, 0 on text and padding (long).
        image_BCHW: float32 images in [0, 1]; all zeros for samples without an image.
        has_image_B: whether each sample has an image (bool).
        sample_index_B: index of each sample in its dataset (long).
    """

    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    modality_BT: torch.Tensor
    image_BCHW: torch.Tensor
    has_image_B: torch.Tensor
    sample_index_B: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Number of sequences B."""
        return self.input_ids_BT.shape[0]

    @property
    def seq_len(self) -> int:
        """Padded sequence length T."""
        return self.input_ids_BT.shape[1]

    def to(self, device: torch.device | str) -> VLMBatch:
        """A copy with every tensor moved to ``device`` (dtypes unchanged)."""
        return VLMBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _pad_batch(rows: list[list[int]], num_image_tokens: list[int], left: bool) -> tuple[torch.Tensor, ...]:
    """Pad token rows to a common length; return ids, attention mask and modality."""
    B, T = len(rows), max(len(r) for r in rows)
    input_ids_BT = torch.full((B, T), WordTokenizer.PAD_ID, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.bool)
    modality_BT = torch.full((B, T), MODALITY_TEXT, dtype=torch.long)
    for b, (row, n_img) in enumerate(zip(rows, num_image_tokens)):
        start = T - len(row) if left else 0
        input_ids_BT[b, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask_BT[b, start : start + len(row)] = True
        modality_BT[b, start + 1 : start + 1 + n_img] = MODALITY_VISION  # right after <bos>
    return input_ids_BT, attention_mask_BT, modality_BT


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_items(items: Sequence[Item]) -> None:
    """What the batch's modality labels, sample indices and images are made from, checked on the host (cheap:
    plain Python values and CPU tensors, before anything reaches a device)."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    shape = None
    for b, item in enumerate(items):
        where = f"item {b} of the batch (sample index {item.get('index')!r})"
        if not item["prompt_ids"]:
            raise DatasetError(f"{where} has no tokens: its prompt_ids are empty -- every sequence starts with "
                               "<bos>; build items with LlavaDataset or drop empty samples")
        n_img = item["num_image_tokens"]
        if not _is_int(n_img) or not 0 <= n_img <= len(item["prompt_ids"]) - 1:
            raise DatasetError(
                f"{where}: num_image_tokens is {n_img!r}, but its image tokens (modality label 1) must fit in the "
                f"prompt after <bos>, i.e. be an integer in 0..{len(item['prompt_ids']) - 1} -- set it to the "
                "number of <image> ids placed right after <bos>")
        if bool(item["has_image"]) != (n_img > 0):
            raise DatasetError(f"{where}: has_image is {item['has_image']!r} but num_image_tokens is {n_img} -- "
                               "a sample has image tokens exactly when it has an image")
        index = item["index"]
        if not _is_int(index) or index < 0:
            raise DatasetError(f"{where}: index is {index!r}, expected the sample's non-negative position in its "
                               "dataset (an int; LlavaDataset items carry it)")
        image_CHW = item["image_CHW"]
        if shape is None:
            shape = tuple(image_CHW.shape)
        elif tuple(image_CHW.shape) != shape:
            raise DatasetError(f"{where}: image_CHW has shape {tuple(image_CHW.shape)}, item 0's has {shape} -- "
                               "resize every image to the dataset's image_size")
        if image_CHW.is_floating_point() and not bool(torch.isfinite(image_CHW).all()):
            raise DatasetError(f"{where}: image_CHW holds NaN or inf pixels -- replace or remove the image "
                               "(pixels are floats in [0, 1])")


def _image_fields(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    return {
        "image_BCHW": torch.stack([item["image_CHW"] for item in items]).to(torch.float32),
        "has_image_B": torch.tensor([item["has_image"] for item in items], dtype=torch.bool),
        "sample_index_B": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


def collate_train(items: Sequence[Item]) -> VLMBatch:
    """Batch full sequences (prompt + answer), right-padded, with answer + ``<eos>`` labels.

    Raises:
        DatasetError: for an item without tokens, image tokens that do not fit in its prompt, a negative
            sample index, or an image of another shape or with NaN/inf pixels.
    """
    _check_items(items)
    rows = [item["prompt_ids"] + item["answer_ids"] for item in items]
    input_ids_BT, attention_mask_BT, modality_BT = _pad_batch(
        rows, [item["num_image_tokens"] for item in items], left=False
    )
    labels_BT = torch.full_like(input_ids_BT, IGNORE_INDEX)
    for b, item in enumerate(items):
        start, end = len(item["prompt_ids"]), len(rows[b])
        labels_BT[b, start:end] = input_ids_BT[b, start:end]
    return VLMBatch(
        input_ids_BT=input_ids_BT,
        labels_BT=labels_BT,
        attention_mask_BT=attention_mask_BT,
        modality_BT=modality_BT,
        **_image_fields(items),
    )


def collate_prompts(items: Sequence[Item]) -> VLMBatch:
    """Batch prompts only (``<bos>`` ... ``<sep>``) for generation, LEFT-padded, labels all -100.

    Left padding puts every prompt's last token in the final column, so generated tokens
    can be appended to all rows at once.

    Raises:
        DatasetError: as :func:`collate_train`.
    """
    _check_items(items)
    rows = [item["prompt_ids"] for item in items]
    input_ids_BT, attention_mask_BT, modality_BT = _pad_batch(
        rows, [item["num_image_tokens"] for item in items], left=True
    )
    return VLMBatch(
        input_ids_BT=input_ids_BT,
        labels_BT=torch.full_like(input_ids_BT, IGNORE_INDEX),
        attention_mask_BT=attention_mask_BT,
        modality_BT=modality_BT,
        **_image_fields(items),
    )


class LlavaDataset(SampleDataset):
    """Tokenized :class:`~ds_smoes.data.llava.Sample` s; images are loaded lazily and cached.

    ``dataset[i]`` is a dict with:

    * ``index`` (int): ``i``;
    * ``prompt_ids`` (list[int]): ``[<bos>] + [<image>] * num_image_tokens + prompt + [<sep>]``;
    * ``answer_ids`` (list[int]): ``answer + [<eos>]``;
    * ``num_image_tokens`` (int): ``image_tokens`` with an image, else 0 (they start at position 1);
    * ``image_CHW`` (Tensor ``[1, image_size, image_size]``): the image, zeros without one;
    * ``has_image`` (bool).

    Attributes:
        num_patches: patches the vision encoder makes of an image.
        image_tokens: image tokens (``<image>`` placeholders) per multimodal sample: ``num_patches``, or fewer
            when the model compresses the vision tokens before the LLM.
        max_seq_len: length of the longest full (prompt + answer) sequence.
    """

    collate_train = staticmethod(collate_train)
    collate_prompts = staticmethod(collate_prompts)

    def __init__(
        self, samples: Sequence[Sample], tokenizer: WordTokenizer, image_size: int, patch_size: int,
        image_tokens: int | None = None,
    ) -> None:
        """Tokenize ``samples``; ``num_patches = (image_size // patch_size) ** 2`` per image, of which
        ``image_tokens`` (default: all) enter the LLM, each behind one ``<image>`` placeholder.

        Raises:
            ConfigError: if ``image_size`` or ``patch_size`` is not a positive int, or
                ``patch_size > image_size``, or ``image_tokens`` is not in 1..num_patches.
        """
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r} -- set it to e.g. 8")
        if not isinstance(patch_size, int) or not 1 <= patch_size <= image_size:
            raise ConfigError(
                f"patch_size must be an integer in 1..image_size ({image_size}), got {patch_size!r} "
                "-- choose a patch size that divides the image size, e.g. 2 or 4 for 8x8 images"
            )
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        if image_tokens is None:
            image_tokens = self.num_patches
        if not _is_int(image_tokens) or not 1 <= image_tokens <= self.num_patches:
            raise ConfigError(f"image_tokens must be an integer in 1..{self.num_patches} (the patches of a "
                              f"{image_size}x{image_size} image in {patch_size}x{patch_size} patches), got "
                              f"{image_tokens!r} -- pass model.compress.pre_llm_budget(num_patches)")
        self.image_tokens = image_tokens
        self._prompt_ids = [tokenizer.encode(s.prompt) for s in self.samples]
        self._answer_ids = [tokenizer.encode(s.answer) for s in self.samples]
        self._images: dict[int, torch.Tensor] = {}
        self.max_seq_len = max(
            (self._seq_len(i) for i in range(len(self.samples))),
            default=0,
        )

    def _seq_len(self, i: int) -> int:
        image_tokens = self.image_tokens if self.is_multimodal(i) else 0
        return 1 + image_tokens + len(self._prompt_ids[i]) + 1 + len(self._answer_ids[i]) + 1

    def image(self, i: int) -> torch.Tensor:
        """Image of sample ``i`` as ``[1, image_size, image_size]`` (zeros without one), cached."""
        path = self.samples[i].image_path
        if path is None:
            return torch.zeros(1, self.image_size, self.image_size)
        if i not in self._images:
            self._images[i] = load_image(path, self.image_size)
        return self._images[i]

    def __getitem__(self, i: int) -> Item:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for a dataset of {len(self)} samples")
        i = i % len(self)
        tok = self.tokenizer
        num_image_tokens = self.image_tokens if self.is_multimodal(i) else 0
        return {
            "index": i,
            "prompt_ids": [tok.bos_id] + [tok.image_id] * num_image_tokens + self._prompt_ids[i] + [tok.sep_id],
            "answer_ids": self._answer_ids[i] + [tok.eos_id],
            "num_image_tokens": num_image_tokens,
            "image_CHW": self.image(i),
            "has_image": num_image_tokens > 0,
        }
