"""A word-level tokenizer built from the training text (no hub download needed).

Text is lowercased and split into words and single punctuation marks with the regex
``\\w+|[^\\w\\s]``. Six special tokens have fixed ids:

=========  ==
``<pad>``  0
``<bos>``  1
``<eos>``  2
``<unk>``  3
``<image>`` 4
``<sep>``  5
=========  ==

:meth:`WordTokenizer.encode` never emits special tokens (the collate functions add
them); :meth:`WordTokenizer.decode` skips them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from ds_smoes.core.errors import DatasetError

PAD, BOS, EOS, UNK, IMAGE, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, SEP)
_WORD_RE = re.compile(r"\w+|[^\w\s]")
_FORMAT = "ds_smoes.WordTokenizer"


def split_words(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words and punctuation marks."""
    return _WORD_RE.findall(text.lower())


class WordTokenizer:
    """Maps words to ids and back; build it with :meth:`build` or :meth:`load`."""

    PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID, SEP_ID = range(len(SPECIAL_TOKENS))

    def __init__(self, tokens: Sequence[str]) -> None:
        """Create a tokenizer from its id-ordered token list (special tokens first)."""
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"token list must start with the special tokens {SPECIAL_TOKENS}, got {tokens[:6]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("token list contains duplicates")
        self._tokens = tuple(tokens)
        self._ids = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        """Build the vocabulary from ``texts``: special tokens, then all words sorted."""
        words: set[str] = set()
        for text in texts:
            words.update(split_words(text))
        words.difference_update(SPECIAL_TOKENS)
        return cls(SPECIAL_TOKENS + tuple(sorted(words)))

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return self.PAD_ID

    @property
    def bos_id(self) -> int:
        """Id of ``<bos>`` (1)."""
        return self.BOS_ID

    @property
    def eos_id(self) -> int:
        """Id of ``<eos>`` (2)."""
        return self.EOS_ID

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (3), used for words not in the vocabulary."""
        return self.UNK_ID

    @property
    def image_id(self) -> int:
        """Id of ``<image>`` (4), one per image patch position."""
        return self.IMAGE_ID

    @property
    def sep_id(self) -> int:
        """Id of ``<sep>`` (5), between prompt and answer."""
        return self.SEP_ID

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens in id order."""
        return self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(self._tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; words outside the vocabulary become ``<unk>``."""
        return [self._ids.get(word, self.unk_id) for word in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: special and out-of-range ids are skipped, words are joined by
        spaces and punctuation marks are attached to the preceding word."""
        out = ""
        for i in ids:
            i = int(i)
            if i < len(SPECIAL_TOKENS) or i >= len(self._tokens):
                continue
            token = self._tokens[i]
            is_word = token[0].isalnum() or token[0] == "_"  # \w+ token, else one punctuation mark
            out += " " + token if out and is_word else token
        return out

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON to ``path`` (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _FORMAT, "version": 1, "tokens": list(self._tokens)}
        path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            DatasetError: if the file is missing or is not a saved WordTokenizer.
        """
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: tokenizer file not found -- check the path or rebuild the tokenizer") from exc
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read tokenizer JSON ({exc}) -- rebuild the tokenizer") from exc
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or not isinstance(
            payload.get("tokens"), list
        ):
            raise DatasetError(f"{path}: not a saved {_FORMAT} file -- rebuild the tokenizer with WordTokenizer.build")
        try:
            return cls(payload["tokens"])
        except ValueError as exc:
            raise DatasetError(f"{path}: invalid tokenizer vocabulary ({exc}) -- rebuild the tokenizer") from exc
