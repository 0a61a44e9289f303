"""`vlaflow eval vqa`: VLMEvalKit multiple-choice benchmarks (`$LMUData/<NAME>.tsv`) answered
by the vision-language expert and scored offline as VLMEvalKit's exact matching scores them.

    out/
      {model}_{NAME}.tsv       one row per question: index, question, [hint], options, answer,
                               prediction, extracted (the letter read from it, or empty), hit (1/0),
                               and the row's split, category and l2-category where the TSV has them
      {model}_{NAME}_acc.csv   split/category, name, correct, total, accuracy: one row overall,
                               then one per split, category and l2-category
      vqa_summary.json         {NAME: {"overall", "total", "chance", "split", "category", "l2-category"}};
                               chance: the accuracy of a random choice among each question's options

`model` is the model folder's name. The prompt is VLMEvalKit's (`ImageMCQDataset.build_prompt`)
with the images before the text. Like VLMEvalKit, a benchmark whose name contains "MMMU" turns
an open question (no options) into options A (the answer) and B ("Other Answers"), and counts an
answer that is not a letter as A.
"""

import ast
import base64
import binascii
import csv
import io
import json
import logging
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import vlaflow.models  # noqa: F401  (registers the model and processor classes)
from vlaflow.backbone.folder import load_vla, verify_model_folder
from vlaflow.data.language import multiple_choice_prompt
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor

logger = logging.getLogger(__name__)

SUMMARY = "vqa_summary.json"
GROUP_COLUMNS = ("split", "category", "l2-category")
REQUIRED_COLUMNS = ("index", "image", "question", "answer")
# A shorter `image` cell is the index of the row whose image this row shares.
IMAGE_REFERENCE_MAX_LENGTH = 64
OPTION_LETTERS = tuple(string.ascii_uppercase)
MMMU_OTHER_ANSWERS = "Other Answers"
# VLMEvalKit reads TSVs with pandas, whose default missing-value strings make a cell absent.
MISSING_CELLS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"]
    + ["NULL", "NaN", "None", "n/a", "nan", "null"]
)
# Predictions that VLMEvalKit scores as refusals, whatever else they contain.
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_PUNCTUATION_TO_SPACES = str.maketrans({character: " " for character in ".()[],:;!*#{}"})


@dataclass(frozen=True)
class Question:
    """One benchmark row: what the model is asked, and what its answer is scored against."""

    index: int
    images: tuple[str, ...]  # base64, shared images resolved
    question: str
    hint: str | None
    options: dict[str, str]  # shown in the prompt
    choices: dict[str, str]  # scored against: the options, or MMMU's reformulated open question
    answer: str  # the correct letter among `choices`
    groups: dict[str, str]  # the row's split, category and l2-category, where it has them


@dataclass(frozen=True)
class Verdict:
    question: Question
    prediction: str
    extracted: str | None
    hit: bool


@dataclass(frozen=True)
class Accuracy:
    group: str  # "overall", "split", "category" or "l2-category"
    name: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


# --- reading a benchmark ---


def read_benchmark(tsv_path: Path, *, limit: int | None = None) -> list[Question]:
    """The first `limit` questions (all when None) of a VLMEvalKit multiple-choice TSV, each
    checked: answer among the options, images decoded once."""
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise VlaflowError(f"{tsv_path}: missing; put the benchmark's VLMEvalKit TSV there")
    header, rows = _read_rows(tsv_path)
    image_cells = {index: row["image"] for index, row in rows}
    option_letters = [letter for letter in OPTION_LETTERS if letter in header]
    mmmu = "MMMU" in tsv_path.stem
    selected = rows if limit is None else rows[:limit]
    questions = [_question(tsv_path, index, row, image_cells, option_letters, mmmu=mmmu) for index, row in selected]
    _check_images(tsv_path, questions)
    return questions


def _read_rows(tsv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    csv.field_size_limit(sys.maxsize)  # real benchmarks hold megabytes of base64 in one cell
    try:
        with open(tsv_path, encoding="utf-8", newline="") as tsv:
            header, rows = _parse_rows(tsv_path, csv.reader(tsv, delimiter="\t"))
    except UnicodeDecodeError as error:
        raise VlaflowError(f"{tsv_path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not rows:
        raise VlaflowError(f"{tsv_path}: no questions")
    return header, rows


def _parse_rows(tsv_path: Path, reader) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    header = next(reader, None) or []
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise VlaflowError(
            f"{tsv_path}: no column {missing[0]!r} in the header (a VLMEvalKit TSV has {REQUIRED_COLUMNS})"
        )
    rows, seen = [], set()
    for cells in reader:
        if not cells:
            continue
        where = f"{tsv_path}: line {reader.line_num}"
        if len(cells) != len(header):
            raise VlaflowError(f"{where}: {len(cells)} fields, the header has {len(header)}")
        row = dict(zip(header, cells))
        try:
            index = int(row["index"])
        except ValueError:
            raise VlaflowError(f"{where}: index: {row['index']!r} is not an integer") from None
        if index in seen:
            raise VlaflowError(f"{where}: index: {index} appears twice")
        seen.add(index)
        rows.append((index, row))
    return header, rows


def _question(
    tsv_path: Path, index: int, row: dict, image_cells: dict, option_letters: list[str], *, mmmu: bool
) -> Question:
    def error(field: str, problem: str) -> VlaflowError:
        return VlaflowError(f"{tsv_path}: row index {index}: {field}: {problem}")

    options = {letter: row[letter] for letter in option_letters if _present(row[letter])}
    choices, answer = dict(options), row["answer"].strip()
    if not answer:
        raise error("answer", "empty")
    if mmmu:
        if "A" not in options:
            choices.update(A=row["answer"], B=MMMU_OTHER_ANSWERS)
        if answer not in OPTION_LETTERS:
            answer = "A"
    if answer not in choices:
        raise error("answer", f"{row['answer']!r} is not the letter of one of the options {sorted(choices)}")
    return Question(
        index=index,
        images=_images(row["image"], image_cells, error),
        question=row["question"],
        hint=row["hint"] if _present(row.get("hint", "")) else None,
        options=options,
        choices=choices,
        answer=answer,
        groups={column: row[column] for column in GROUP_COLUMNS if _present(row.get(column, ""))},
    )


def _present(cell: str) -> bool:
    return cell not in MISSING_CELLS


def _images(cell: str, image_cells: dict, error) -> tuple[str, ...]:
    if not cell:
        raise error("image", "empty")
    if len(cell) <= IMAGE_REFERENCE_MAX_LENGTH:
        try:
            shared = image_cells.get(int(cell), "")
        except ValueError:
            raise error("image", f"{cell!r} is neither an image nor the index of another row") from None
        if len(shared) <= IMAGE_REFERENCE_MAX_LENGTH:
            raise error("image", f"refers to index {cell}, which holds no image")
        cell = shared
    if cell.startswith("[") and cell.endswith("]"):
        try:
            images = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise error("image", "starts like a list of images but is not a valid Python list of strings") from None
        if not images or not all(isinstance(image, str) for image in images):
            raise error("image", "a list of images must hold base64 strings")
    else:
        images = [cell]
    return tuple(images)


def _check_images(tsv_path: Path, questions: list[Question]) -> None:
    decoded = set()  # rows that share an image share its string; decode it once
    for question in questions:
        for number, image in enumerate(question.images):
            if image in decoded:
                continue
            try:
                with Image.open(io.BytesIO(base64.b64decode(image))) as opened:
                    opened.load()
            except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as problem:
                which = f"image {number + 1} of {len(question.images)}" if len(question.images) > 1 else "the image"
                raise VlaflowError(
                    f"{tsv_path}: row index {question.index}: image: {which} is not a decodable base64 image ({problem})"
                ) from None
            decoded.add(image)


def decode_image(image: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")


# --- prompting and scoring ---


def mcq_prompt(question: Question) -> str:
    return multiple_choice_prompt(question.question, question.options, question.hint)


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter VLMEvalKit's exact matching (`can_infer`) reads from a prediction, or
    None when it reads none (the item is then wrong)."""
    prediction = prediction.strip()
    if any(refusal in prediction for refusal in REFUSALS):
        return None
    words = prediction.translate(_PUNCTUATION_TO_SPACES).split()
    letters = [letter for letter in options if letter in words]
    # VLMEvalKit's window: the letter's first occurrence is past len(words) - 5, one of the last four words
    if len(letters) == 1 and words.index(letters[0]) > len(words) - 5:
        return letters[0]
    if not letters and "Z" in words:  # VLMEvalKit's "none of the options"
        return None
    return _option_restated(prediction, options)


def _option_restated(prediction: str, options: dict[str, str]) -> str | None:
    lowered = prediction.lower()
    # VLMEvalKit does not look for options in a prediction this long
    if len(lowered) > 2 * sum(len(text) for text in options.values()):
        return None
    restated = [letter for letter, text in options.items() if text.lower() in lowered]
    return restated[0] if len(restated) == 1 else None


def score(questions: list[Question], predictions: list[str]) -> list[Verdict]:
    verdicts = []
    for question, prediction in zip(questions, predictions, strict=True):
        extracted = extract_choice(prediction, question.choices)
        verdicts.append(Verdict(question, prediction, extracted, extracted == question.answer))
    return verdicts


def accuracy_table(verdicts: list[Verdict]) -> list[Accuracy]:
    """Overall, then per split, category and l2-category (each by name)."""
    table = [Accuracy("overall", "Overall", sum(verdict.hit for verdict in verdicts), len(verdicts))]
    for group in GROUP_COLUMNS:
        counts: dict[str, list[int]] = {}
        for verdict in verdicts:
            if group in verdict.question.groups:
                tally = counts.setdefault(verdict.question.groups[group], [0, 0])
                tally[0] += verdict.hit
                tally[1] += 1
        table += [Accuracy(group, name, correct, total) for name, (correct, total) in sorted(counts.items())]
    return table


def chance_accuracy(questions: list[Question]) -> float:
    """The expected accuracy of answering every question with a random one of its choices."""
    return sum(1 / len(question.choices) for question in questions) / len(questions)


def benchmark_summary(table: list[Accuracy], questions: list[Question]) -> dict:
    overall = table[0]
    summary = {"overall": overall.accuracy, "total": overall.total, "chance": chance_accuracy(questions)}
    for group in GROUP_COLUMNS:
        summary[group] = {row.name: row.accuracy for row in table if row.group == group}
    return summary


# --- answering ---


def load_vl_model(model_dir: Path):
    """A VLA model folder's model (on the GPU when there is one, in eval mode) and processor."""
    model_dir = Path(model_dir)
    config = verify_model_folder(model_dir)
    if config["model_type"] != "qwen2_vla":
        raise VlaflowError(f"{model_dir}: model_type is {config['model_type']!r}; evaluation needs a VLA model folder")
    processor = load_processor(model_dir)
    model = load_vla(model_dir, dtype="auto")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


@torch.no_grad()
def answer_batch(
    model, processor, images: list[list[Image.Image]], prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers of the vision-language expert to single-turn prompts, images before the text."""
    inputs = processor.generation_inputs(images, prompts).to(model.device)
    new_tokens = model.answer(**inputs, max_new_tokens=max_new_tokens)
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def answer_benchmark(
    model, processor, name: str, questions: list[Question], *, batch_size: int, max_new_tokens: int
) -> list[str]:
    predictions = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        images = [[decode_image(image) for image in question.images] for question in batch]
        predictions += answer_batch(
            model, processor, images, [mcq_prompt(question) for question in batch], max_new_tokens
        )
        logger.info("%s: %d of %d questions answered", name, len(predictions), len(questions))
    return predictions


# --- the command ---


def evaluate_vqa(
    model_dir: Path,
    benchmarks: list[str],
    lmudata: Path,
    out: Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
) -> dict:
    """Answer and score each benchmark `$LMUData/<NAME>.tsv` (its first `limit` rows when given);
    write the new folder `out` and return its summary. Every TSV is checked before the model loads."""
    for setting, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        if value is not None and value < 1:
            raise VlaflowError(f"{setting}={value}: must be at least 1")
    if not benchmarks:
        raise VlaflowError("no benchmark named; name at least one, e.g. EasyVQA or MMStar")
    model_dir = Path(model_dir)
    model_name = model_dir.resolve().name
    summary = {}
    with atomic_directory(Path(out)) as staging:
        questions = {
            name: read_benchmark(Path(lmudata) / f"{name}.tsv", limit=limit) for name in dict.fromkeys(benchmarks)
        }
        model, processor = load_vl_model(model_dir)
        for name, benchmark in questions.items():
            predictions = answer_benchmark(
                model, processor, name, benchmark, batch_size=batch_size, max_new_tokens=max_new_tokens
            )
            verdicts = score(benchmark, predictions)
            table = accuracy_table(verdicts)
            write_predictions(staging / f"{model_name}_{name}.tsv", verdicts)
            write_accuracy(staging / f"{model_name}_{name}_acc.csv", table)
            summary[name] = benchmark_summary(table, benchmark)
            logger.info("%s: accuracy %.4f over %d questions", name, summary[name]["overall"], table[0].total)
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def write_predictions(path: Path, verdicts: list[Verdict]) -> None:
    questions = [verdict.question for verdict in verdicts]
    with_hint = any(question.hint is not None for question in questions)
    letters = sorted({letter for question in questions for letter in question.choices})
    groups = [group for group in GROUP_COLUMNS if any(group in question.groups for question in questions)]
    with open(path, "w", encoding="utf-8", newline="") as tsv:
        writer = csv.writer(tsv, delimiter="\t", lineterminator="\n")
        writer.writerow(
            ["index", "question", *["hint"] * with_hint, *letters, "answer", "prediction", "extracted", "hit", *groups]
        )
        for verdict in verdicts:
            question = verdict.question
            writer.writerow(
                [
                    question.index,
                    question.question,
                    *[question.hint or ""] * with_hint,
                    *[question.choices.get(letter, "") for letter in letters],
                    question.answer,
                    verdict.prediction,
                    verdict.extracted or "",
                    int(verdict.hit),
                    *[question.groups.get(group, "") for group in groups],
                ]
            )


def write_accuracy(path: Path, table: list[Accuracy]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["split/category", "name", "correct", "total", "accuracy"])
        for row in table:
            writer.writerow([row.group, row.name, row.correct, row.total, f"{row.accuracy:.4f}"])
