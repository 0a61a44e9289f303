"""`vlaflow eval vqa`: VLMEvalKit multiple-choice benchmarks (`$LMUData/<NAME>.tsv`) answered
by the vision-language expert and scored offline exactly as VLMEvalKit scores them
(`vlaflow.evaluation.exact_matching`).

    out/
      {model}_{NAME}.xlsx           VLMEvalKit's prediction file: the benchmark's rows without
                                    images, and a `prediction` column; VLMEvalKit scores it as is
      {model}_{NAME}_verdicts.tsv   per scored row (per rotated set, for a circular benchmark):
                                    index, GT, prediction, extracted (the letter read, or empty), hit
      {model}_{NAME}_acc.csv        VLMEvalKit's table: per split, Overall and each l2-category and
                                    category (MMBench's abbreviated)
      metrics.json                  {NAME: {metric: value}}: the generic figures the report lays out
      vqa_summary.json              {NAME: {"vlmevalkit": the table's rows, "overall", "total",
                                    "chance", "split", "category", "l2-category"}}: vlaflow's pooled
                                    figures beside VLMEvalKit's table; chance is the accuracy of a
                                    random choice among each question's options (every rotation's,
                                    for a circular set)

`model` is the model folder's name. The benchmark is read as VLMEvalKit reads it (pandas, so an
all-number option column with gaps shows `4.0` and a "None" cell is `nan`). The prompt is
VLMEvalKit's (`ImageMCQDataset.build_prompt`): the images, then the text; for a benchmark whose name
contains "MMMU" the images go where the question's `<image N>` placeholders put them
(`MMMUDataset.split_MMMU`).
"""

import ast
import base64
import binascii
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

import vlaflow.models  # noqa: F401  (registers the model and processor classes)
from vlaflow.backbone.folder import load_vla, verify_model_folder
from vlaflow.data.language import multiple_choice_prompt
from vlaflow.errors import VlaflowError
from vlaflow.evaluation import exact_matching
from vlaflow.evaluation.exact_matching import is_circular, is_mmmu
from vlaflow.evaluation.metrics import add_metrics
from vlaflow.fs import atomic_directory
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor

logger = logging.getLogger(__name__)

SUMMARY = "vqa_summary.json"
REQUIRED_COLUMNS = ("index", "image", "question", "answer")
TABLE_COLUMNS = ("split", "category", "l2-category")
# A shorter `image` cell is the index of the row whose image this row shares.
IMAGE_REFERENCE_MAX_LENGTH = 64
MMMU_IMAGE_PLACEHOLDER = "<image "


@dataclass(frozen=True)
class Question:
    """One benchmark row as VLMEvalKit reads it: cells keep pandas' types (a number stays a number,
    a missing cell is NaN)."""

    index: int
    images: tuple[str, ...]  # base64, shared images resolved
    question: object
    hint: object | None
    options: dict[str, object]  # shown in the prompt
    answer: str  # VLMEvalKit's ground truth (for MMMU, a non-letter answer is "A")

    @property
    def choice_count(self) -> int:
        """The options it is scored among: MMMU scores an open question as A or B."""
        return len(self.options) or 2


@dataclass(frozen=True)
class Benchmark:
    name: str
    rows: pd.DataFrame  # VLMEvalKit's `dataset.data`: the rows as read, images resolved
    questions: list[Question]


# --- reading a benchmark ---


def read_benchmark(tsv_path: Path, *, limit: int | None = None) -> Benchmark:
    """The first `limit` rows (all when None) of a VLMEvalKit multiple-choice TSV, as VLMEvalKit's
    `ImageBaseDataset` reads them, each checked: an integer index, an answer among the options,
    images that decode."""
    tsv_path = Path(tsv_path)
    rows = _read_rows(tsv_path)
    name = tsv_path.stem
    image_cells = {index: str(cell) for index, cell in zip(rows["index"], rows["image"]) if not pd.isna(cell)}
    if limit is not None:
        rows = rows.iloc[:limit]
    questions = [_question(tsv_path, name, row, image_cells) for _, row in rows.iterrows()]
    rows = rows.assign(
        image=[list(question.images) if len(question.images) > 1 else question.images[0] for question in questions]
    )
    _check_images(tsv_path, questions)
    return Benchmark(name, rows, questions)


def _read_rows(tsv_path: Path) -> pd.DataFrame:
    if not tsv_path.is_file():
        raise VlaflowError(f"{tsv_path}: missing; put the benchmark's VLMEvalKit TSV there")
    try:
        rows = pd.read_csv(tsv_path, sep="\t")
    except UnicodeDecodeError as error:
        raise VlaflowError(f"{tsv_path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except pd.errors.EmptyDataError:
        raise VlaflowError(f"{tsv_path}: no questions") from None
    except pd.errors.ParserError as error:
        raise VlaflowError(f"{tsv_path}: {' '.join(str(error).split())}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in rows.columns]
    if missing:
        raise VlaflowError(
            f"{tsv_path}: no column {missing[0]!r} in the header (a VLMEvalKit TSV has {REQUIRED_COLUMNS})"
        )
    if rows.empty:
        raise VlaflowError(f"{tsv_path}: no questions")
    indices, seen = [], set()
    for position, cell in enumerate(rows["index"]):
        try:
            index = int(str(cell))
        except ValueError:
            raise VlaflowError(f"{tsv_path}: line {position + 2}: index: {cell!r} is not an integer") from None
        if index in seen:
            raise VlaflowError(f"{tsv_path}: line {position + 2}: index: {index} appears twice")
        indices.append(index)
        seen.add(index)
    for group in TABLE_COLUMNS:
        missing = [index for index, cell in zip(indices, rows[group]) if pd.isna(cell)] if group in rows else []
        if missing:
            raise VlaflowError(
                f"{tsv_path}: row index {missing[0]}: {group}: empty (VLMEvalKit's table needs a value in every row)"
            )
    return rows.assign(index=indices)


def _question(tsv_path: Path, name: str, row: pd.Series, image_cells: dict) -> Question:
    index = row["index"]

    def error(field: str, problem: str) -> VlaflowError:
        return VlaflowError(f"{tsv_path}: row index {index}: {field}: {problem}")

    options = exact_matching.row_choices(row)
    answer = row["answer"]
    if pd.isna(answer):
        raise error("answer", "empty")
    answer = exact_matching.ground_truth(name, answer)
    choices = options
    if is_mmmu(name) and not is_circular(name) and not options:
        choices = {"A": row["answer"], "B": exact_matching.MMMU_OTHER_ANSWERS}
    if answer not in choices:
        raise error("answer", f"{row['answer']!r} is not the letter of one of the options {sorted(choices)}")
    hint = row["hint"] if "hint" in row and not pd.isna(row["hint"]) else None
    return Question(index, _images(row["image"], image_cells, error), row["question"], hint, options, answer)


def _images(cell, image_cells: dict, error) -> tuple[str, ...]:
    if pd.isna(cell):
        raise error("image", "empty")
    cell = str(cell)
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


# --- prompting ---


def mcq_prompt(question: Question) -> str:
    """VLMEvalKit's multiple-choice prompt text; cells print as VLMEvalKit prints them (`4.0`, `nan`)."""
    return multiple_choice_prompt(question.question, question.options, question.hint)


def prompt_message(benchmark: str, question: Question) -> list[dict]:
    """VLMEvalKit's message for a question: `{"type": "image", "value": base64}` parts and
    `{"type": "text", "value": text}` parts, in VLMEvalKit's order."""
    message = [{"type": "image", "value": image} for image in question.images]
    message.append({"type": "text", "value": mcq_prompt(question)})
    return _interleave_mmmu(question, message) if is_mmmu(benchmark) else message


def _interleave_mmmu(question: Question, message: list[dict]) -> list[dict]:
    """`MMMUDataset.split_MMMU`: the text cut at each `<image N>`, image N put there (N is one digit)."""
    images, text = question.images, message[-1]["value"]
    segments = text.split(MMMU_IMAGE_PLACEHOLDER)
    if len(segments) == 1:
        return message
    parts = [{"type": "text", "value": segments[0]}]
    for segment in segments[1:]:
        if not (segment[:1].isdigit() and segment[1:2] == ">" and 1 <= int(segment[0]) <= len(images)):
            raise VlaflowError(
                f"row index {question.index}: question: {MMMU_IMAGE_PLACEHOLDER}{segment[:3]!r} names no image "
                f"of its {len(images)} (MMMU's placeholders are <image 1> to <image 9>)"
            )
        parts.append({"type": "image", "value": images[int(segment[0]) - 1]})
        parts.append({"type": "text", "value": segment[2:]})
    return parts


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
def answer_messages(model, processor, messages: list[list], max_new_tokens: int) -> list[str]:
    """Greedy answers of the vision-language expert to single-turn messages, each a list of
    images (PIL) and texts in the order the model sees them."""
    inputs = processor.interleaved_inputs(messages).to(model.device)
    new_tokens = model.answer(**inputs, max_new_tokens=max_new_tokens)
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def answer_benchmark(model, processor, benchmark: Benchmark, *, batch_size: int, max_new_tokens: int) -> list[str]:
    predictions, questions = [], benchmark.questions
    for start in range(0, len(questions), batch_size):
        messages = [
            [
                decode_image(part["value"]) if part["type"] == "image" else part["value"]
                for part in prompt_message(benchmark.name, question)
            ]
            for question in questions[start : start + batch_size]
        ]
        predictions += answer_messages(model, processor, messages, max_new_tokens)
        logger.info("%s: %d of %d questions answered", benchmark.name, len(predictions), len(questions))
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
        read = [read_benchmark(Path(lmudata) / f"{name}.tsv", limit=limit) for name in dict.fromkeys(benchmarks)]
        model, processor = load_vl_model(model_dir)
        for benchmark in read:
            predictions = answer_benchmark(
                model, processor, benchmark, batch_size=batch_size, max_new_tokens=max_new_tokens
            )
            stem = staging / f"{model_name}_{benchmark.name}"
            scored = score_benchmark(benchmark, predictions, stem.with_name(stem.name + ".xlsx"))
            write_verdicts(stem.with_name(stem.name + "_verdicts.tsv"), scored.rows)
            exact_matching.write_accuracy_table(stem.with_name(stem.name + "_acc.csv"), scored.table)
            summary[benchmark.name] = benchmark_summary(benchmark, scored)
            add_metrics(staging, benchmark.name, vqa_metrics(summary[benchmark.name]))
            logger.info(
                "%s: accuracy %.4f over %d questions",
                benchmark.name,
                summary[benchmark.name]["overall"],
                summary[benchmark.name]["total"],
            )
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def score_benchmark(benchmark: Benchmark, predictions: list[str], prediction_file: Path) -> exact_matching.Scored:
    """Write VLMEvalKit's prediction file and score what VLMEvalKit reads back from it."""
    exact_matching.write_prediction_file(prediction_file, benchmark.rows, predictions)
    read_back = exact_matching.read_prediction_file(prediction_file)
    return exact_matching.score_predictions(read_back, benchmark.rows, benchmark.name)


def chance_accuracy(benchmark: Benchmark) -> float:
    """The expected accuracy of answering every question with a random one of its choices; a
    circular benchmark's rotated set counts only if every rotation is guessed right."""
    if not is_circular(benchmark.name):
        return sum(1 / question.choice_count for question in benchmark.questions) / len(benchmark.questions)
    groups = exact_matching.circular_groups(benchmark.rows)
    odds = {}
    for group, question in zip(groups, benchmark.questions):
        odds[group] = odds.get(group, 1.0) / question.choice_count
    main = [question.index for question in benchmark.questions if question.index in odds]
    return sum(odds[index] for index in main) / len(main)


def benchmark_summary(benchmark: Benchmark, scored: exact_matching.Scored) -> dict:
    table = [{name: None if pd.isna(value) else value for name, value in row.items()} for row in scored.table]
    return {**exact_matching.pooled_accuracy(scored.rows), "chance": chance_accuracy(benchmark), "vlmevalkit": table}


def vqa_metrics(summary: dict) -> dict[str, float]:
    """The generic metrics of a benchmark: the pooled accuracy, chance, and VLMEvalKit's table,
    each cell as "<column> (<split>)"."""
    metrics = {"accuracy": summary["overall"], "chance": summary["chance"]}
    for row in summary["vlmevalkit"]:
        metrics |= {f"{column} ({row['split']})": value for column, value in row.items() if column != "split"}
    return metrics


def write_verdicts(path: Path, scored: pd.DataFrame) -> None:
    columns = ["index", "GT", "prediction", "extracted", "hit"]
    columns += [group for group in ("split", "category", "l2-category") if group in scored]
    scored[columns].to_csv(path, sep="\t", index=False)
