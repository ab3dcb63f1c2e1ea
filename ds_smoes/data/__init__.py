"""Data pipeline: the digits dataset generator, the LLaVA loader, the tokenizer and batching.

Typical use::

    from ds_smoes.data import (LlavaDataset, WordTokenizer, collate_train,
                               generate_digits_dataset, load_llava_json)

    generate_digits_dataset(Path("data/digits"), seed=0)
    train = load_llava_json(Path("data/digits/train.json"), Path("data/digits"))
    tokenizer = WordTokenizer.build([t for s in train for t in (s.prompt, s.answer)])
    dataset = LlavaDataset(train, tokenizer, image_size=8, patch_size=2)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collate_train)
"""

from typing import TYPE_CHECKING

from ds_smoes.data.collate import (
    IGNORE_INDEX,
    MODALITY_TEXT,
    MODALITY_VISION,
    LlavaDataset,
    VLMBatch,
    collate_prompts,
    collate_train,
)
from ds_smoes.data.llava import Sample, load_image, load_llava_json
from ds_smoes.data.tokenizer import SPECIAL_TOKENS, WordTokenizer

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime see __getattr__ below
    from ds_smoes.data.digits import GENERATOR_VERSION, generate_digits_dataset

_LAZY_FROM_DIGITS = ("GENERATOR_VERSION", "generate_digits_dataset")

__all__ = [
    "GENERATOR_VERSION",
    "IGNORE_INDEX",
    "MODALITY_TEXT",
    "MODALITY_VISION",
    "SPECIAL_TOKENS",
    "LlavaDataset",
    "Sample",
    "VLMBatch",
    "WordTokenizer",
    "collate_prompts",
    "collate_train",
    "generate_digits_dataset",
    "load_image",
    "load_llava_json",
]


def __getattr__(name: str) -> object:
    """Import the digits generator on first use.

    Eagerly importing ``ds_smoes.data.digits`` here would make
    ``python -m ds_smoes.data.digits`` warn that the module was already imported.
    """
    if name in _LAZY_FROM_DIGITS:
        from ds_smoes.data import digits

        return getattr(digits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
