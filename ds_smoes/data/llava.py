"""Read LLaVA-style conversation data (JSON or JSON-lines) plus an image folder.

A record looks like::

    {"id": "x", "image": "images/0123.png",
     "conversations": [{"from": "human", "value": "<image>\\nwhich digit is this?"},
                       {"from": "gpt", "value": "seven"}],
     "task": "digit_name"}

``image`` and ``task`` are optional; ``id`` defaults to the record's index. Every
problem raises :class:`~ds_smoes.core.errors.DatasetError` naming the file, the record
(0-based index and id), what is wrong and what to do about it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ds_smoes.core.errors import DatasetError

IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_RE = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")
_ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Sample:
    """One question/answer pair ready for tokenization.

    ``prompt`` has the ``<image>`` placeholder removed: the collate function places the
    image patch tokens itself, right after ``<bos>``. ``image_path`` is absolute or
    relative to the working directory (image folder already joined), or None for a
    language-only sample.
    """

    id: str
    prompt: str
    answer: str
    image_path: Path | None
    task: str | None


class SampleDataset(Dataset):
    """A dataset over `samples` (a list of :class:`Sample`): what evaluation asks of every dataset,
    `len`, `is_multimodal(i)` and the reference `answer(i)`; subclasses say how a sample is encoded."""

    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def is_multimodal(self, i: int) -> bool:
        """Whether sample ``i`` has an image."""
        return self.samples[i].image_path is not None

    def answer(self, i: int) -> str:
        """Reference answer text of sample ``i``."""
        return self.samples[i].answer


def strip_image_placeholder(text: str) -> str:
    """Remove every ``<image>`` token and the whitespace/newlines around it."""
    return _PLACEHOLDER_RE.sub(" ", text).strip()


def _read_records(json_path: Path) -> list[Any]:
    """Parse a JSON list (or a ``.jsonl`` file, one object per line) into raw records."""
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: file not found -- check the data path (e.g. --data-path / --val-data-path)")
    try:
        text = json_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path}: cannot read file ({exc}) -- check it is a UTF-8 text file") from exc
    if not text.strip():
        raise DatasetError(f"{json_path}: file is empty -- it must hold a JSON list of LLaVA records")

    if json_path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{json_path}: invalid JSON at line {line_no}, column {exc.colno}: {_json_problem(exc)} "
                    "-- fix that line (each line of a .jsonl file must be one complete JSON object)"
                ) from exc
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{json_path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {_json_problem(exc)} "
                "-- fix the file (use a .jsonl suffix if it holds one JSON object per line)"
            ) from exc
        if not isinstance(records, list):
            raise DatasetError(
                f"{json_path}: top level is a JSON {type(records).__name__}, expected a list of records "
                "-- wrap the records in [...]"
            )
    if not records:
        raise DatasetError(f"{json_path}: contains no records -- add at least one LLaVA record")
    return records


def _json_problem(exc: json.JSONDecodeError) -> str:
    """json's message without its dangling "starting at" (the position is given beside it), and a
    word on truncation when the error is at the end of the text."""
    msg = exc.msg.removesuffix(" starting at").removesuffix(" at")
    if exc.pos >= len(exc.doc.rstrip()) - 1 or msg.startswith("Unterminated"):
        msg += " (the text ends early: is the file truncated?)"
    return msg


def _parse_record(raw: Any, index: int, json_path: Path, image_folder: Path) -> Sample:
    """Validate one raw record and turn it into a :class:`Sample`."""
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{json_path}: record {index}: is a JSON {type(raw).__name__}, expected an object "
            'with a "conversations" list -- fix or remove this record'
        )
    record_id = str(raw.get("id", index))
    where = f"{json_path}: record {index} (id {record_id!r})"

    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(
            f'{where}: "conversations" is missing or not a non-empty list -- '
            'give [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]'
        )
    texts = []
    for t, turn in enumerate(turns):
        expected = _ROLES[t % 2]
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DatasetError(
                f'{where}: turn {t} must be an object with a string "value" -- '
                'use {"from": "human"|"gpt", "value": "..."}'
            )
        role = turn.get("from")
        if role != expected:
            raise DatasetError(
                f'{where}: turn {t} has "from": {role!r}, expected {expected!r} -- turns must alternate '
                '"human", "gpt", "human", ... starting with "human"'
            )
        texts.append(turn["value"])
    if len(turns) % 2 != 0:
        raise DatasetError(
            f'{where}: conversation ends with a "human" turn -- add the "gpt" answer as the last turn'
        )

    has_placeholder = any(IMAGE_PLACEHOLDER in text for text in texts)
    image = raw.get("image")
    image_path = None
    if image is None:
        if has_placeholder:
            raise DatasetError(
                f'{where}: text contains "{IMAGE_PLACEHOLDER}" but the record has no "image" field -- '
                f'add "image": "<path under the image folder>" or remove "{IMAGE_PLACEHOLDER}" from the text'
            )
    else:
        if not isinstance(image, str) or not image:
            raise DatasetError(
                f'{where}: "image" must be a non-empty string path, got {image!r} -- '
                "give the image path relative to the image folder"
            )
        image_path = image_folder / image
        if not image_path.is_file():
            raise DatasetError(
                f"{where}: image {image!r} not found under '{image_folder}' -- "
                'check data.image_folder or the record\'s "image" field'
            )

    answer = texts[-1].strip()
    if not answer:
        raise DatasetError(f'{where}: the last "gpt" turn is empty -- give the expected answer text')
    prompt = "\n".join(s for s in (strip_image_placeholder(text) for text in texts[:-1]) if s)

    task = raw.get("task")
    if task is not None and not isinstance(task, str):
        raise DatasetError(f'{where}: "task" must be a string, got {task!r} -- use a short task name or drop it')
    return Sample(id=record_id, prompt=prompt, answer=answer, image_path=image_path, task=task)


def load_llava_json(json_path: Path, image_folder: Path) -> list[Sample]:
    """Load and validate a LLaVA conversation file.

    ``json_path`` holds a JSON list of records, or one record per line if its suffix is
    ``.jsonl``. Image paths are resolved against ``image_folder`` and must exist. The
    prompt is every turn before the final ``gpt`` turn joined with ``"\\n"`` (placeholder
    removed); the answer is that final turn, stripped.

    Raises:
        DatasetError: for an unreadable, malformed or empty file, or an invalid record.
    """
    json_path, image_folder = Path(json_path), Path(image_folder)
    records = _read_records(json_path)
    return [_parse_record(raw, index, json_path, image_folder) for index, raw in enumerate(records)]


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """Load an image as a float32 greyscale tensor ``[1, image_size, image_size]`` in [0, 1].

    The image is converted to one channel ("L") and resized with bilinear filtering if its
    size differs (non-square images are stretched, not cropped).

    Raises:
        DatasetError: if the file is missing or is not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels_HW = np.asarray(img, dtype=np.float32) / 255.0
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{path}: image file not found -- check the image folder and the record's \"image\" field"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image ({exc}) -- replace or remove this corrupt image") from exc
    return torch.from_numpy(pixels_HW.copy()).unsqueeze(0)


def unreadable_image(samples: list[Sample], image_size: int, split: str, part: int = 0, parts: int = 1) -> str | None:
    """The first problem found decoding the distinct images of `samples` (those whose index among them is `part`
    modulo `parts`, so that ranks share the work), naming the split, the record and the file; None when every one
    decodes.  Images load lazily in training: checked up front, a corrupt file stops a run in seconds instead of
    at the step (or the evaluation) that happens to read it."""
    first: dict[Path, Sample] = {}
    for s in samples:
        if s.image_path is not None and s.image_path not in first:
            first[s.image_path] = s
    for i, (path, s) in enumerate(first.items()):
        if i % parts != part:
            continue
        try:
            load_image(path, image_size)
        except DatasetError as err:
            return f"the {split} split's record {s.id!r}: {err}"
    return None
