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

The **canvas variant** (``canvas_size=32`` or ``48``; default: off) is the same set with
each 8x8 digit pasted at a seeded position (on a 4-pixel grid) on a larger canvas of seeded,
low-amplitude background noise (grey levels 0..``CANVAS_NOISE_MAX`` of 255, below most strokes), and a
fourth multimodal question, "where is the digit?", answered by the canvas quadrant that
holds the whole digit (``topleft``, ``topright``, ``bottomleft``, ``bottomright``: one
word, hence one token, each).  With 4x4 patches a 32x32 canvas is 64 vision tokens of
which the digit covers 4, so which tokens matter depends on the question: the
digit's own patches for its identity, where the non-noise patches lie for its location.
Splits, language questions and set sizes are those of the plain set for the same seed.
Without a canvas the generator writes exactly the bytes it always did.

Randomness only uses :meth:`random.Random.random` on string-seeded generators, whose
output Python guarantees to be stable across versions, so a seed always yields the same
bytes.

Command line::

    python -m ds_smoes.data.digits --out data/digits [--seed 0] [--force]
    python -m ds_smoes.data.digits --out data/digits_canvas32 --canvas-size 32
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
CANVAS_TASKS = MULTIMODAL_TASKS + ("digit_where",)
# Quadrants of the canvas, in the order (row, column) = (0, 0), (0, 1), (1, 0), (1, 1).
LOCATIONS = ("topleft", "topright", "bottomleft", "bottomright")
CANVAS_NOISE_MAX = 24  # background noise grey levels 0..24 of 255 (a digit stroke is up to 255)
# Digits sit on a 4-pixel grid: with 4x4 patches (configs/canvas.yaml) a digit always covers exactly 2x2 patches
# wherever it is, so a vision-token budget means the same for every image (4 of 64 tokens can hold the whole
# digit), and the encoder never meets a digit cut 16 different ways across 4 to 9 patches.
CANVAS_GRID = 4
MIN_CANVAS_SIZE = 2 * IMAGE_SIZE  # each quadrant must hold a whole 8x8 digit
LANGUAGE_TASKS = ("text_plus", "text_minus", "text_greater", "text_larger")
# The "sums" language side (``language="sums"``): two-digit sums ("what is 4 7 plus 3 5?" -> "8 2") and the larger
# of two two-digit numbers ("which is larger, 4 7 or 3 5?" -> "4 7"), operands written digit by digit, whose test
# and validation questions never occur in training (the pairs are split, not sampled per split), so that
# language-only accuracy measures a skill, not memory, and does not saturate at the demo's model size.
LANGUAGE_VARIANTS = ("words", "sums")
SUM_TASKS = ("text_sum", "text_max")
SUM_COUNTS = {"train": 2000, "val": 100, "test": 200}   # per task
SUM_OPERANDS = range(10, 100)

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


def multimodal_question(task: str, label: int, addend: int = 0, location: str | None = None) -> tuple[str, str]:
    """Question text (without ``<image>``) and answer for a multimodal ``task`` on digit ``label``
    (``location``, one of :data:`LOCATIONS`, only for the canvas task ``digit_where``)."""
    if task == "digit_where":
        if location not in LOCATIONS:
            raise ValueError(f"digit_where needs a location among {LOCATIONS}, got {location!r}")
        return "where is the digit?", location
    if task == "digit_name":
        return "which digit is this?", number_word(label)
    if task == "digit_even":
        return "is this digit even?", "yes" if label % 2 == 0 else "no"
    if task == "digit_plus":
        return f"what is this digit plus {number_word(addend)}?", number_word(label + addend)
    raise ValueError(f"unknown multimodal task {task!r}; expected one of {CANVAS_TASKS}")


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


def spelled(value: int) -> str:
    """A non-negative integer digit by digit: ``107 -> "1 0 7"`` (each digit one token)."""
    if value < 0:
        raise ValueError(f"spelled numbers are non-negative, got {value}")
    return " ".join(str(value))


def sum_question(task: str, a: int, b: int) -> tuple[str, str]:
    """Question and answer of a "sums" language task on two-digit ``a`` and ``b``."""
    if task == "text_sum":
        return f"what is {spelled(a)} plus {spelled(b)}?", spelled(a + b)
    if task == "text_max":
        if a == b:
            raise ValueError("text_max needs two different numbers")
        return f"which is larger, {spelled(a)} or {spelled(b)}?", spelled(max(a, b))
    raise ValueError(f"unknown sums task {task!r}; expected one of {SUM_TASKS}")


def _sum_records(seed: int) -> dict[str, list[Record]]:
    """Per split, the "sums" questions: every (a, b) pair of a task is shuffled once and cut into test, val and
    train, so no test or validation question occurs in training."""
    out: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for task in SUM_TASKS:
        pairs = [(a, b) for a in SUM_OPERANDS for b in SUM_OPERANDS if task != "text_max" or a != b]
        pairs = _shuffled(_rng(seed, f"sums/{task}"), pairs)
        start = 0
        for split in ("test", "val", "train"):
            for a, b in pairs[start:start + SUM_COUNTS[split]]:
                out[split].append(_record(*sum_question(task, a, b), task, None))
            start += SUM_COUNTS[split]
    return out


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


def _multimodal_records(split: str, indices: list[int], labels: np.ndarray, seed: int,
                        locations: Sequence[str] | None = None) -> list[Record]:
    """Questions about the split's images: 2 distinct templates per train image, 1 otherwise.
    With ``locations`` (the canvas variant: each image's quadrant) the templates include ``digit_where``,
    drawn from a stream of its own so the plain set's stream is untouched."""
    stream = f"{split}/multimodal" if locations is None else f"{split}/multimodal-canvas"
    rng = _rng(seed, stream)
    tasks_pool = MULTIMODAL_TASKS if locations is None else CANVAS_TASKS
    per_image = TRAIN_QUESTIONS_PER_IMAGE if split == "train" else 1
    records = []
    for index in indices:
        tasks = _shuffled(rng, tasks_pool)[:per_image]
        for task in tasks:
            addend = 1 + _below(rng, 3) if task == "digit_plus" else 0
            location = locations[index] if locations is not None else None
            question, answer = multimodal_question(task, int(labels[index]), addend, location)
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


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 1,797 digits: ([N, 8, 8] grey levels 0..16, [N] labels).  Imported lazily:
    sklearn takes about 2 s to import."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def grey_levels(images: np.ndarray) -> np.ndarray:
    """Digits' grey levels 0..16 scaled to 0..255 (uint8), as every image of the set is written."""
    return np.rint(images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)


def quadrant_places(canvas_size: int) -> tuple[int, int]:
    """(half the canvas side, grid offsets per axis inside a quadrant that keep the whole digit in it)."""
    half = canvas_size // 2
    return half, (half - IMAGE_SIZE) // CANVAS_GRID + 1


def _write_images(out_dir: Path, images: np.ndarray) -> None:
    """Write every digit as an 8x8 greyscale PNG with grey levels 0..16 scaled to 0..255."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for index, pixels_HW in enumerate(grey_levels(images)):
        Image.fromarray(pixels_HW).save(out_dir / image_relpath(index))


def check_canvas_size(canvas_size: int | None) -> None:
    """Raise ValueError unless ``canvas_size`` is None or a side of at least 16 pixels, a multiple of 8
    (each quadrant must hold a whole 8x8 digit, and start on the 4-pixel grid)."""
    if canvas_size is None:
        return
    if isinstance(canvas_size, bool) or not isinstance(canvas_size, int):
        raise ValueError(f"canvas size must be an integer, got {canvas_size!r}")
    if canvas_size < MIN_CANVAS_SIZE or canvas_size % (2 * CANVAS_GRID):
        raise ValueError(f"canvas size must be a multiple of {2 * CANVAS_GRID} and at least {MIN_CANVAS_SIZE} (a "
                         f"whole 8x8 digit in each quadrant, on the {CANVAS_GRID}-pixel grid), got {canvas_size}; "
                         "e.g. 32 or 48")


def canvas_layout(num_images: int, canvas_size: int, seed: int) -> list[tuple[int, int, str]]:
    """Per image: the top-left pixel ``(row, col)`` of its 8x8 digit on the canvas and its quadrant.

    The quadrant is drawn uniformly, then the offset inside it on the :data:`CANVAS_GRID`, so the
    whole digit lies inside that quadrant (and inside the canvas): the location answer is never
    ambiguous.  A 32x32 canvas has 3x3 places per quadrant, a 48x48 one 5x5."""
    check_canvas_size(canvas_size)
    rng = _rng(seed, f"canvas{canvas_size}/positions")
    half, free = quadrant_places(canvas_size)
    layout = []
    for _ in range(num_images):
        quadrant = _below(rng, len(LOCATIONS))
        row = (quadrant // 2) * half + CANVAS_GRID * _below(rng, free)
        col = (quadrant % 2) * half + CANVAS_GRID * _below(rng, free)
        layout.append((row, col, LOCATIONS[quadrant]))
    return layout


def canvas_pixels(digit_HW: np.ndarray, row: int, col: int, canvas_size: int, rng: random.Random) -> np.ndarray:
    """One canvas (uint8, ``canvas_size`` square): noise in 0..CANVAS_NOISE_MAX everywhere, and the
    digit (grey levels 0..16 scaled to 0..255) at ``(row, col)`` over it (the brighter of the two)."""
    noise = [_below(rng, CANVAS_NOISE_MAX + 1) for _ in range(canvas_size * canvas_size)]
    canvas_HW = np.asarray(noise, dtype=np.uint8).reshape(canvas_size, canvas_size)
    digit_HW = grey_levels(digit_HW)
    h, w = digit_HW.shape
    canvas_HW[row:row + h, col:col + w] = np.maximum(canvas_HW[row:row + h, col:col + w], digit_HW)
    return canvas_HW


def _write_canvas_images(out_dir: Path, images: np.ndarray, layout: list[tuple[int, int, str]],
                         canvas_size: int, seed: int) -> None:
    """Write every digit on its noisy canvas (one noise stream, images in index order)."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, f"canvas{canvas_size}/noise")
    for index, (digit_HW, (row, col, _)) in enumerate(zip(images, layout)):
        Image.fromarray(canvas_pixels(digit_HW, row, col, canvas_size, rng)).save(out_dir / image_relpath(index))


def check_language(language: str) -> None:
    if language not in LANGUAGE_VARIANTS:
        raise ValueError(f"language must be one of {LANGUAGE_VARIANTS}, got {language!r}")


def generate_digits_dataset(out_dir: Path, seed: int = 0, *, force: bool = False,
                            canvas_size: int | None = None, language: str = "words") -> dict[str, Any]:
    """Write the digits VQA dataset to ``out_dir`` and return its manifest.

    Layout: ``images/{index:04d}.png``, ``train.json``, ``val.json``, ``test.json`` (LLaVA
    records) and ``manifest.json``. If a manifest with the same ``seed``, generator version
    and variant (``canvas_size``) is already there (and the split files exist), nothing is
    written and that manifest is returned, unless ``force`` is True.

    ``canvas_size`` (None: the plain 8x8 set): the canvas variant (module docstring), whose
    images are ``canvas_size`` square, whose records ask "where is the digit?" too and whose
    manifest records ``variant``, ``canvas_size`` and ``image_size`` (= ``canvas_size``).

    ``language``: ``words`` (the default: one-digit arithmetic and comparisons in number words, sampled per
    split) or ``sums`` (two-digit sums and the larger of two numbers, digit by digit, test questions never in training;
    the manifest then records ``language``).
    """
    check_canvas_size(canvas_size)
    check_language(language)
    out_dir = Path(out_dir)
    existing = None if force else _read_manifest(out_dir)
    if (existing is not None and existing.get("seed") == seed and existing.get("version") == GENERATOR_VERSION
            and existing.get("canvas_size") == canvas_size and existing.get("language", "words") == language):
        return existing

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # a partial run must never look complete

    images_NHW, labels = sklearn_digits()
    locations = None
    if canvas_size is None:
        _write_images(out_dir, images_NHW)
    else:
        layout = canvas_layout(len(labels), canvas_size, seed)
        _write_canvas_images(out_dir, images_NHW, layout, canvas_size, seed)
        locations = [where for _, _, where in layout]
    id_prefix = ("digits" if canvas_size is None else f"digits-canvas{canvas_size}") + (
        "-sums" if language == "sums" else "")
    sums = _sum_records(seed) if language == "sums" else None

    image_splits = split_image_indices(len(labels), seed)
    splits: dict[str, Any] = {}
    records_by_split: dict[str, list[Record]] = {}
    for split in SPLITS:
        records = _multimodal_records(split, image_splits[split], labels, seed, locations)
        records += _language_records(split, LANGUAGE_COUNTS[split], seed) if sums is None else sums[split]
        records = _shuffled(_rng(seed, f"{split}/order"), records)
        records = [{"id": f"{id_prefix}-{split}-{i:05d}", **r} for i, r in enumerate(records)]
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
    if language != "words":   # the words sets keep exactly their old keys (and bytes)
        manifest["language"] = language
    if canvas_size is not None:  # the plain set's manifest keeps exactly its old keys (and bytes)
        manifest["image_size"] = canvas_size
        manifest.update({
            "variant": "canvas",
            "canvas_size": canvas_size,
            "digit_size": IMAGE_SIZE,
            "grid": CANVAS_GRID,
            "noise_max": CANVAS_NOISE_MAX,
            "locations": list(LOCATIONS),
            "image_locations": dict(sorted(Counter(locations).items())),
        })
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
    canvas = manifest.get("canvas_size")
    variant = f", digits on a {canvas}x{canvas} noisy canvas" if canvas else ""
    variant += ", two-digit sums as language questions" if manifest.get("language") == "sums" else ""
    return (
        f"Digits dataset (seed {manifest['seed']}, generator v{manifest['version']}{variant}) in {out_dir}: "
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
    parser.add_argument("--canvas-size", type=int, default=None, metavar="N",
                        help="the canvas variant: each digit at a seeded place on an NxN noisy canvas (e.g. 32, "
                             "with 4x4 patches 64 vision tokens), plus 'where is the digit?' questions; "
                             "train with model.image_size N and data.canvas_size N")
    parser.add_argument("--language", choices=LANGUAGE_VARIANTS, default="words",
                        help="the language-only questions: words (one-digit arithmetic in number words; default) or "
                             "sums (two-digit sums and the larger of two numbers, digit by digit, test questions "
                             "unseen in training)")
    args = parser.parse_args(argv)
    try:
        check_canvas_size(args.canvas_size)
    except ValueError as err:
        parser.error(str(err))
    manifest = generate_digits_dataset(args.out, args.seed, force=args.force, canvas_size=args.canvas_size,
                                       language=args.language)
    print(summarize(manifest, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
