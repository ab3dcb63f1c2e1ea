"""A small, real, reproducible LLaVA-format dataset built from scikit-learn's digits.

scikit-learn bundles 1797 handwritten digit images (8x8, grey levels 0..16) with the
library, so this dataset needs no download. :func:`generate_digits_dataset` turns them
into a vision-language question answering set in the LLaVA conversation format:

* multimodal questions about an image ("which digit is this?", "is this digit even?",
  "what is this digit plus two?"), and
* language-only arithmetic and comparison questions ("what is three plus four?"),

so that a mixture-of-experts model sees two modalities. Answers are single lowercase
words. Images are split disjointly (70% train, 10% val, 20% test) by a seeded
permutation; language-only questions are sampled independently per split, so a
question text can recur across splits (``manifest.json`` reports how often).

Randomness only uses :meth:`random.Random.random` on string-seeded generators, whose
output Python guarantees to be stable across versions, so a seed always yields the same
bytes.

Command line::

    python -m ds_smoes.data.digits --out data/digits [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

GENERATOR_NAME = "ds_smoes.data.digits"
GENERATOR_VERSION = 1
IMAGE_SIZE = 8
SPLITS = ("train", "val", "test")
TRAIN_FRACTION = 0.7
VAL_FRACTION = 0.1
LANGUAGE_COUNTS = {"train": 2400, "val": 200, "test": 400}
TRAIN_QUESTIONS_PER_IMAGE = 2

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen",
)  # fmt: skip

MULTIMODAL_TASKS = ("digit_name", "digit_even", "digit_plus")
LANGUAGE_TASKS = ("text_plus", "text_minus", "text_greater", "text_larger")

Record = dict[str, Any]


def number_word(value: int) -> str:
    """Return the English word for ``value`` in 0..18 (e.g. ``7 -> "seven"``)."""
    if not 0 <= value < len(NUMBER_WORDS):
        raise ValueError(f"no number word for {value}; supported range is 0..{len(NUMBER_WORDS) - 1}")
    return NUMBER_WORDS[value]


def _rng(seed: int, stream: str) -> random.Random:
    """An independent, version-stable random stream for one purpose (string seeding)."""
    return random.Random(f"{GENERATOR_NAME}/v{GENERATOR_VERSION}/seed={seed}/{stream}")


def _below(rng: random.Random, n: int) -> int:
    """Uniform integer in ``[0, n)`` using only ``rng.random()`` (stable across Pythons)."""
    return min(int(rng.random() * n), n - 1)


def _shuffled(rng: random.Random, items: Sequence[Any]) -> list[Any]:
    """Fisher-Yates shuffle built on :func:`_below`, returning a new list."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = _below(rng, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def multimodal_question(task: str, label: int, addend: int = 0) -> tuple[str, str]:
    """Question text (without ``<image>``) and answer for a multimodal ``task`` on digit ``label``."""
    if task == "digit_name":
        return "which digit is this?", number_word(label)
    if task == "digit_even":
        return "is this digit even?", "yes" if label % 2 == 0 else "no"
    if task == "digit_plus":
        return f"what is this digit plus {number_word(addend)}?", number_word(label + addend)
    raise ValueError(f"unknown multimodal task {task!r}; expected one of {MULTIMODAL_TASKS}")


def language_question(task: str, a: int, b: int) -> tuple[str, str]:
    """Question text and answer for a language-only ``task`` on operands ``a`` and ``b``."""
    wa, wb = number_word(a), number_word(b)
    if task == "text_plus":
        return f"what is {wa} plus {wb}?", number_word(a + b)
    if task == "text_minus":
        if a < b:
            raise ValueError(f"text_minus needs a >= b, got {a} < {b}")
        return f"what is {wa} minus {wb}?", number_word(a - b)
    if task == "text_greater":
        return f"is {wa} greater than {wb}?", "yes" if a > b else "no"
    if task == "text_larger":
        if a == b:
            raise ValueError("text_larger needs two different numbers")
        return f"which is larger, {wa} or {wb}?", number_word(max(a, b))
    raise ValueError(f"unknown language task {task!r}; expected one of {LANGUAGE_TASKS}")


def _record(question: str, answer: str, task: str, image: str | None) -> Record:
    """One LLaVA record without its id (assigned after shuffling)."""
    record: Record = {}
    if image is not None:
        record["image"] = image
        question = f"<image>\n{question}"
    record["conversations"] = [
        {"from": "human", "value": question},
        {"from": "gpt", "value": answer},
    ]
    record["task"] = task
    return record


def image_relpath(index: int) -> str:
    """Path of image ``index`` relative to the dataset folder, e.g. ``images/0123.png``."""
    return f"images/{index:04d}.png"


def split_image_indices(num_images: int, seed: int) -> dict[str, list[int]]:
    """Disjoint image index lists per split from one seeded permutation (70/10/20)."""
    order = _shuffled(_rng(seed, "image-split"), range(num_images))
    n_train = round(TRAIN_FRACTION * num_images)
    n_val = round(VAL_FRACTION * num_images)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _multimodal_records(split: str, indices: list[int], labels: np.ndarray, seed: int) -> list[Record]:
    """Questions about the split's images: 2 distinct templates per train image, 1 otherwise."""
    rng = _rng(seed, f"{split}/multimodal")
    per_image = TRAIN_QUESTIONS_PER_IMAGE if split == "train" else 1
    records = []
    for index in indices:
        tasks = _shuffled(rng, MULTIMODAL_TASKS)[:per_image]
        for task in tasks:
            addend = 1 + _below(rng, 3) if task == "digit_plus" else 0
            question, answer = multimodal_question(task, int(labels[index]), addend)
            records.append(_record(question, answer, task, image_relpath(index)))
    return records


def _language_records(split: str, count: int, seed: int) -> list[Record]:
    """``count`` language-only questions sampled with the split's own seeded stream."""
    rng = _rng(seed, f"{split}/language")
    records = []
    for _ in range(count):
        task = LANGUAGE_TASKS[_below(rng, len(LANGUAGE_TASKS))]
        a, b = _below(rng, 10), _below(rng, 10)
        if task == "text_minus" and a < b:
            a, b = b, a
        while task == "text_larger" and a == b:
            b = _below(rng, 10)
        question, answer = language_question(task, a, b)
        records.append(_record(question, answer, task, None))
    return records


def _question_text(record: Record) -> str:
    """The human turn's text of a record."""
    return record["conversations"][0]["value"]


def _split_stats(file_name: str, records: list[Record], num_images: int) -> dict[str, Any]:
    """Manifest entry of one split: file, record/image counts and records per task."""
    multimodal = sum(1 for r in records if "image" in r)
    return {
        "file": file_name,
        "records": len(records),
        "images": num_images,
        "multimodal": multimodal,
        "language": len(records) - multimodal,
        "tasks": dict(sorted(Counter(r["task"] for r in records).items())),
    }


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The existing manifest, or None if absent, unreadable or its split files are missing."""
    path = out_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if not all((out_dir / f"{split}.json").is_file() for split in SPLITS):
        return None
    return manifest


def _write_images(out_dir: Path, images: np.ndarray) -> None:
    """Write every digit as an 8x8 greyscale PNG with grey levels 0..16 scaled to 0..255."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for index, pixels_HW in enumerate(pixels):
        Image.fromarray(pixels_HW).save(out_dir / image_relpath(index))


def generate_digits_dataset(out_dir: Path, seed: int = 0, *, force: bool = False) -> dict[str, Any]:
    """Write the digits VQA dataset to ``out_dir`` and return its manifest.

    Layout: ``images/{index:04d}.png``, ``train.json``, ``val.json``, ``test.json`` (LLaVA
    records) and ``manifest.json``. If a manifest with the same ``seed`` and generator
    version is already there (and the split files exist), nothing is written and that
    manifest is returned, unless ``force`` is True.
    """
    out_dir = Path(out_dir)
    existing = None if force else _read_manifest(out_dir)
    if existing is not None and existing.get("seed") == seed and existing.get("version") == GENERATOR_VERSION:
        return existing

    from sklearn.datasets import load_digits  # imported lazily: sklearn takes ~2 s to import

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # a partial run must never look complete

    digits = load_digits()
    images_NHW, labels = digits.images, digits.target
    _write_images(out_dir, images_NHW)

    image_splits = split_image_indices(len(labels), seed)
    splits: dict[str, Any] = {}
    records_by_split: dict[str, list[Record]] = {}
    for split in SPLITS:
        records = _multimodal_records(split, image_splits[split], labels, seed)
        records += _language_records(split, LANGUAGE_COUNTS[split], seed)
        records = _shuffled(_rng(seed, f"{split}/order"), records)
        records = [{"id": f"digits-{split}-{i:05d}", **r} for i, r in enumerate(records)]
        _dump_json(out_dir / f"{split}.json", records)
        splits[split] = _split_stats(f"{split}.json", records, len(image_splits[split]))
        records_by_split[split] = records

    train_questions = {_question_text(r) for r in records_by_split["train"] if "image" not in r}
    test_questions = [_question_text(r) for r in records_by_split["test"] if "image" not in r]
    seen = sum(q in train_questions for q in test_questions) / max(len(test_questions), 1)

    manifest = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "source": "sklearn.datasets.load_digits",
        "image_size": IMAGE_SIZE,
        "num_images": int(len(labels)),
        "splits": splits,
        "language_test_seen_in_train": round(seen, 4),
    }
    _dump_json(manifest_path, manifest)
    return manifest


def summarize(manifest: dict[str, Any], out_dir: Path) -> str:
    """A one-paragraph human-readable summary of a manifest."""
    parts = []
    for split in SPLITS:
        s = manifest["splits"][split]
        parts.append(
            f"{split} {s['records']} records ({s['multimodal']} multimodal on {s['images']} images, "
            f"{s['language']} language-only)"
        )
    seen = manifest["language_test_seen_in_train"]
    return (
        f"Digits dataset (seed {manifest['seed']}, generator v{manifest['version']}) in {out_dir}: "
        + "; ".join(parts)
        + f". {seen:.1%} of test language-only questions also appear verbatim in train. "
        f"Train on {out_dir / 'train.json'} with image folder {out_dir}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: generate (or reuse) the dataset and print a summary."""
    parser = argparse.ArgumentParser(
        prog="python -m ds_smoes.data.digits",
        description="Generate the LLaVA-format handwritten-digits VQA dataset (no download needed).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/digits")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the same seed exists")
    args = parser.parse_args(argv)
    manifest = generate_digits_dataset(args.out, args.seed, force=args.force)
    print(summarize(manifest, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
