"""Which conversations a training stage sees: a task filter, and the caption task of the recipe's stage I.

The recipe (docs/recipe.md) trains its stages on parts of one dataset: the language stage on the language-only
questions, stage I (projector alignment) on captions, stages II-III on every question.  :func:`select_tasks`
keeps a split's samples whose ``task`` is listed; the task :data:`CAPTION_TASK` adds one caption per distinct
image of the split ("<image> what is this?" -> "seven"), built from the generated canvas digits' labels and
layout (their ``manifest.json``: seed and canvas size), never from another split.

The caption names the digit only, in words the language stage taught the language model (number words): stage
I trains the projector alone, and a projector cannot teach a frozen language model to say a word it never said.
Measured (seed 0, docs/recipe.md): captions "seven topleft" reached an exact match of 0.011 after 20 epochs
(loss 1.53), the digit word alone 0.908 after 10.  Where the digit is, stage II learns.  The caption's words are
all words of the questions and answers, so every stage shares one vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ds_smoes.core.errors import DatasetError
from ds_smoes.data.llava import Sample

CAPTION_TASK = "digit_caption"
CAPTION_QUESTION = "what is this?"
LANGUAGE_ONLY = "language_only"
"""Not a task of the records: every conversation without an image (the recipe's language stage)."""


def caption_samples(samples: Sequence[Sample], image_folder: Path) -> list[Sample]:
    """One caption sample per distinct image of `samples` (in order of first use): the question
    :data:`CAPTION_QUESTION`, the answer the digit's word ("seven").  `image_folder` must hold the generated canvas
    digits (``python -m ds_smoes.data.digits --canvas-size N``)."""
    from ds_smoes.data.digits import GENERATOR_NAME, number_word, sklearn_digits

    manifest_path = Path(image_folder) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"the task {CAPTION_TASK} needs the generated canvas digits' {manifest_path}: {err}") from None
    canvas = manifest.get("canvas_size") if isinstance(manifest, dict) else None
    if manifest.get("generator") != GENERATOR_NAME or canvas is None:
        raise DatasetError(f"the task {CAPTION_TASK} needs the canvas digits (data.canvas_size 32 or 48); "
                           f"{manifest_path} describes another dataset")
    _, labels = sklearn_digits()
    out, seen = [], set()
    for s in samples:
        if s.image_path is None or s.image_path in seen:
            continue
        seen.add(s.image_path)
        index = int(Path(s.image_path).stem)   # images/{index:04d}.png, the generator's own naming
        answer = number_word(int(labels[index]))
        out.append(Sample(id=f"caption-{Path(s.image_path).stem}", prompt=CAPTION_QUESTION, answer=answer,
                          image_path=s.image_path, task=CAPTION_TASK))
    return out


def select_tasks(samples: Sequence[Sample], tasks: Sequence[str] | None, image_folder: Path,
                 split: str) -> list[Sample]:
    """The samples of `split` whose task is in `tasks` (None: all; :data:`LANGUAGE_ONLY`: every sample without an
    image), captions first when `tasks` names :data:`CAPTION_TASK`.  DatasetError when a task is unknown to the
    split or nothing is left."""
    if tasks is None:
        return list(samples)
    present = sorted({s.task for s in samples if s.task is not None})
    unknown = [t for t in tasks if t not in (CAPTION_TASK, LANGUAGE_ONLY) and t not in present]
    if unknown:
        raise DatasetError(f"data.tasks names {unknown}, which the {split} split does not have; its tasks are "
                           f"{present} (and {CAPTION_TASK}, built from its images, and {LANGUAGE_ONLY}: every "
                           "conversation without an image)")
    kept = caption_samples(samples, image_folder) if CAPTION_TASK in tasks else []
    kept += [s for s in samples if s.task in tasks or (LANGUAGE_ONLY in tasks and s.image_path is None)]
    if not kept:
        raise DatasetError(f"data.tasks {list(tasks)} leaves no conversation in the {split} split")
    return kept


def with_text_share(samples: Sequence[Sample], share: float | None, seed: int) -> list[Sample]:
    """`samples` with their language-only ones cut to `share` of the result (None: unchanged): a seeded choice,
    in the samples' order, of round(share / (1 - share) * multimodal) of them (all if there are fewer).  Stage III
    of a multimodal-heavy mix (MoE-LLaVA, SMAR) sees a few text-only conversations, so that it can cost
    language ability and gates can differ in how much of it they keep."""
    if share is None:
        return list(samples)
    import random

    text = [i for i, s in enumerate(samples) if s.image_path is None]
    multimodal = len(samples) - len(text)
    want = min(len(text), round(share / (1.0 - share) * multimodal))
    keep = set(random.Random(f"ds_smoes.text_share/{seed}").sample(text, want))
    return [s for i, s in enumerate(samples) if s.image_path is not None or i in keep]
