"""easy-VQA (one coloured shape per 64x64 image) as LLaVA training conversations and as a
VLMEvalKit multiple-choice benchmark: the embedded default's vision-language data.

Training folder, from the train split (4,000 images, 38,575 questions):

    out_dir/
      images/<image_id>.png     copies of the package's images (JPEGs at other sizes on request)
      easy_vqa_train.json       LLaVA list: one multi-turn conversation per image (some text-only on request)

Benchmark, from the test split (1,000 images, 9,673 questions): one VLMEvalKit TSV, by
convention `LMUData/EasyVQA.tsv`, with columns `index`, `image`, `question`, `A`..,
`answer`, `category`, `l2-category`, `split`. VLMEvalKit's prompt adds the options and
`language.MULTIPLE_CHOICE_INSTRUCTION` itself, so `question` holds the bare question.

Options come from the answer's group, so a question offers as many options as its group holds,
up to `options`; the remaining option cells stay empty, which VLMEvalKit reads as absent:

| category | answers                                               | options |
|----------|-------------------------------------------------------|---------|
| shape    | circle, rectangle, triangle                           | 3       |
| color    | red, green, blue, black, gray, teal, brown, yellow    | 4       |
| yes/no   | yes, no                                               | 2       |

`l2-category` is the question's template family:

| l2-category            | questions like                                           |
|------------------------|----------------------------------------------------------|
| shape-identification   | what shape is in the image? what is the blue shape?      |
| color-identification   | what color is the shape? what is the color of the circle?|
| shape-presence         | is there a circle? does the image contain a triangle?    |
| color-presence         | is there a red shape? is a teal shape present?           |
| shape-absence          | is there not a circle? is no triangle present?           |
| color-absence          | does the image not contain a gray shape?                 |

Every random choice draws from a generator seeded by `seed` and the item (image or question),
so a smaller `limit` yields a subset of a larger one, entry for entry.
"""

import base64
import csv
import json
import random
import re
import shutil
import string
from collections import defaultdict
from pathlib import Path

import easy_vqa
from PIL import Image

from vlaflow.data.conversations import IMAGE_PLACEHOLDER
from vlaflow.data.language import multiple_choice_prompt
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory, atomic_file

EASY_VQA_BENCHMARK = "EasyVQA"
TRAIN_JSON = "easy_vqa_train.json"
IMAGES_FOLDER = "images"
# Images carry 8 to 12 questions for the most part; 8 keeps most of them in one short conversation.
DEFAULT_MAX_TURNS = 8

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")
ANSWER_GROUPS = {"shape": SHAPES, "color": COLORS, "yes/no": YES_NO}

_COLOR_WORD = re.compile(r"\b(?:" + "|".join(COLORS) + r")\b")
_NEGATION = re.compile(r"\b(?:not|no)\b")


def answer_category(answer: str) -> str:
    """The group of an easy-VQA answer: "shape", "color" or "yes/no"."""
    for category, group in ANSWER_GROUPS.items():
        if answer in group:
            return category
    raise VlaflowError(f"easy-vqa answer {answer!r} is in no known group; expected one of {ANSWER_GROUPS}")


def question_family(question: str) -> str:
    """The question's template family (the benchmark's `l2-category`), e.g. "color-absence"."""
    if question.startswith("what"):
        # "what is the blue shape?" names a colour but asks for the shape.
        return "color-identification" if "color" in question else "shape-identification"
    attribute = "color" if _COLOR_WORD.search(question) else "shape"
    return f"{attribute}-{'absence' if _NEGATION.search(question) else 'presence'}"


def build_easy_vqa_train(
    out_dir: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    multiple_choice: float = 0.0,
    options: int = 4,
    image_sizes: list[tuple[int, int]] | None = None,
    text_only: float = 0.0,
) -> Path:
    """Write the LLaVA training folder: for each of `limit` images (all when None), up to
    `max_turns` of its questions in a shuffled order, the bare answer word as the reply. A
    `multiple_choice` fraction of the questions is asked in VLMEvalKit's multiple-choice format
    instead and answered with the option's letter, as LLaVA's instruction mix does with A-OKVQA.

    Real instruction mixes are less uniform than easy-vqa's 64x64 PNGs; two options make the data
    look like them. With `image_sizes` ((height, width) pairs), the images are written as JPEGs
    at those sizes in turn. A `text_only` fraction of the entries has no image: it asks which
    group the answer words belong to, as the text-only conversations of LLaVA's mix do."""
    _require_positive(limit=limit, max_turns=max_turns)
    for name, fraction in (("multiple_choice", multiple_choice), ("text_only", text_only)):
        if not 0 <= fraction <= 1:
            raise VlaflowError(f"{name}={fraction}: a fraction between 0 and 1")
    questions, answers, image_ids = easy_vqa.get_train_questions()
    pairs_by_image = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids):
        pairs_by_image[image_id].append((question, answer))
    chosen_images = _seeded_subset(sorted(pairs_by_image), limit, seed)
    image_paths = easy_vqa.get_train_image_paths()

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        (staging / IMAGES_FOLDER).mkdir()
        entries = []
        for number, image_id in enumerate(chosen_images):
            rng = random.Random(f"{seed}:{image_id}")
            pairs = rng.sample(pairs_by_image[image_id], min(max_turns, len(pairs_by_image[image_id])))
            if rng.random() < text_only:
                turns = _turns([_as_text_only(answer, rng) for _, answer in pairs], with_image=False)
                entries.append({"id": f"easy_vqa_text_{image_id}", "conversations": turns})
                continue
            pairs = [
                _as_multiple_choice(*pair, options, rng) if rng.random() < multiple_choice else pair for pair in pairs
            ]
            size = image_sizes[number % len(image_sizes)] if image_sizes else None
            image_name = _write_image(image_paths[image_id], staging / IMAGES_FOLDER, image_id, size)
            entries.append({"id": f"easy_vqa_train_{image_id}", "image": image_name, "conversations": _turns(pairs)})
        (staging / TRAIN_JSON).write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")
    return out_dir


def build_easy_vqa_benchmark(tsv_path: Path, *, limit: int | None = None, seed: int = 0, options: int = 4) -> Path:
    """Write the VLMEvalKit multiple-choice TSV of `limit` test questions (all when None), with
    `options` option columns and distractors from the correct answer's group."""
    _require_positive(limit=limit)
    if not 2 <= options <= len(string.ascii_uppercase):
        raise VlaflowError(f"options={options}: a multiple-choice question needs 2 to 26 options")
    letters = string.ascii_uppercase[:options]
    questions, answers, image_ids = easy_vqa.get_test_questions()
    # File order groups an image's questions, so rows sharing an image follow the one that holds it.
    chosen_positions = _seeded_subset(range(len(questions)), limit, seed)
    image_paths = easy_vqa.get_test_image_paths()

    tsv_path = Path(tsv_path)
    first_row_of_image = {}
    with atomic_file(tsv_path) as staging, open(staging, "w", encoding="utf-8", newline="") as tsv:
        writer = csv.writer(tsv, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "image", "question", *letters, "answer", "category", "l2-category", "split"])
        for index, position in enumerate(chosen_positions):
            question, answer, image_id = questions[position], answers[position], image_ids[position]
            if image_id in first_row_of_image:
                image = str(first_row_of_image[image_id])
            else:
                first_row_of_image[image_id] = index
                image = base64.b64encode(Path(image_paths[image_id]).read_bytes()).decode("ascii")
            choices = _choices(answer, options, random.Random(f"{seed}:{position}"))
            option_cells = choices + [""] * (options - len(choices))
            row = [index, image, question, *option_cells, letters[choices.index(answer)]]
            writer.writerow(row + [answer_category(answer), question_family(question), "test"])
    return tsv_path


def _choices(answer: str, options: int, rng: random.Random) -> list[str]:
    group = ANSWER_GROUPS[answer_category(answer)]
    distractors = rng.sample([other for other in group if other != answer], min(options, len(group)) - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices


def _as_multiple_choice(question: str, answer: str, options: int, rng: random.Random) -> tuple[str, str]:
    choices = _choices(answer, options, rng)
    letters = string.ascii_uppercase[: len(choices)]
    prompt = multiple_choice_prompt(question, dict(zip(letters, choices)))
    return prompt, letters[choices.index(answer)]


def _write_image(source: str, folder: Path, image_id, size: tuple[int, int] | None) -> str:
    if size is None:
        shutil.copyfile(source, folder / f"{image_id}.png")
        return f"{image_id}.png"
    height, width = size
    with Image.open(source) as image:
        image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(
            folder / f"{image_id}.jpg", quality=90
        )
    return f"{image_id}.jpg"


def _as_text_only(answer: str, rng: random.Random) -> tuple[str, str]:
    """A question answered from the text alone: which group an answer word belongs to."""
    groups = [group for group in ANSWER_GROUPS if group != "yes/no"]
    category = answer_category(answer)
    if category not in groups:  # yes/no: ask about a word of another group
        category = rng.choice(groups)
        answer = rng.choice(ANSWER_GROUPS[category])
    return f"Is {answer} a {' or a '.join(groups)}?", category


def _turns(pairs: list[tuple[str, str]], with_image: bool = True) -> list[dict]:
    turns = []
    for number, (question, answer) in enumerate(pairs):
        prompt = f"{IMAGE_PLACEHOLDER}\n{question}" if number == 0 and with_image else question
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return turns


def _seeded_subset(items, limit: int | None, seed: int) -> list:
    """`limit` of `items`, in their original order; the first `limit` of one seeded shuffle, so
    a larger limit keeps every item a smaller one chose."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def _require_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise VlaflowError(f"{name}={value}: must be at least 1")
