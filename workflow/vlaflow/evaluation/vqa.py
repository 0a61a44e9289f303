"""`vlaflow eval vqa`: VLMEvalKit benchmarks (`$LMUData/<NAME>.tsv`) answered by the
vision-language expert and scored offline exactly as VLMEvalKit scores them. A benchmark is of one
kind (`vlaflow.evaluation.benchmarks`), which reads, prompts and scores it: multiple choice
(`vlaflow.evaluation.exact_matching`) or yes-or-no (`vlaflow.evaluation.yes_or_no`).

    out/
      {model}_{NAME}.xlsx           VLMEvalKit's prediction file: the benchmark's rows without
                                    images, and a `prediction` column; VLMEvalKit scores it as is
      {model}_{NAME}_verdicts.tsv   per scored row (per rotated set, for a circular benchmark):
                                    index, GT, prediction, extracted (what was read, or empty), hit
      {model}_{NAME}_acc.csv        VLMEvalKit's table for the benchmark (for multiple choice: per
                                    split, Overall and each l2-category and category)
      metrics.json                  {NAME: {metric: value}}: the generic figures the report lays out
      vqa_summary.json              {NAME: {"kind", "vlmevalkit": the table's rows, "overall",
                                    "total", "chance", "split", "category", "l2-category"}}:
                                    vlaflow's pooled accuracy beside VLMEvalKit's table; chance is
                                    the accuracy of answering at random

`model` is the model folder's name. The benchmark is read as VLMEvalKit reads it (pandas, so an
all-number option column with gaps shows `4.0` and a "None" cell is `nan`); the prompt is the one
VLMEvalKit's dataset class for the kind builds.
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
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.benchmark_kind import (
    BenchmarkKind,
    Question,
    Scored,
    pooled_accuracy,
    read_prediction_file,
    write_accuracy_table,
    write_prediction_file,
)
from vlaflow.evaluation.benchmarks import benchmark_kind
from vlaflow.evaluation.metrics import add_metrics
from vlaflow.fs import atomic_directory
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor

logger = logging.getLogger(__name__)

SUMMARY = "vqa_summary.json"
REQUIRED_COLUMNS = ("index", "image", "question", "answer")
# A shorter `image` cell is the index of the row whose image this row shares.
IMAGE_REFERENCE_MAX_LENGTH = 64


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: BenchmarkKind
    rows: pd.DataFrame  # VLMEvalKit's `dataset.data`: the rows as read, images resolved
    questions: list[Question]

    def prompt(self, question: Question) -> list[dict]:
        return self.kind.prompt(self.name, question)


# --- reading a benchmark ---


def read_benchmark(tsv_path: Path, *, kind: str | None = None, limit: int | None = None) -> Benchmark:
    """The first `limit` rows (all when None) of a VLMEvalKit benchmark TSV, as VLMEvalKit's
    `ImageBaseDataset` reads them, each checked: an integer index, images that decode, and what
    its kind (`benchmark_kind(name, kind)`) needs, e.g. an answer among the options."""
    tsv_path = Path(tsv_path)
    rows = _read_rows(tsv_path)
    name = tsv_path.stem
    benchmark_kind_ = benchmark_kind(name, kind)
    image_cells = {index: str(cell) for index, cell in zip(rows["index"], rows["image"]) if not pd.isna(cell)}
    if limit is not None:
        rows = rows.iloc[:limit]
    benchmark_kind_.check_rows(tsv_path, name, rows)
    questions = [_question(tsv_path, name, benchmark_kind_, row, image_cells) for _, row in rows.iterrows()]
    rows = rows.assign(
        image=[list(question.images) if len(question.images) > 1 else question.images[0] for question in questions]
    )
    _check_images(tsv_path, questions)
    return Benchmark(name, benchmark_kind_, rows, questions)


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
    return rows.assign(index=indices)


def _question(tsv_path: Path, benchmark: str, kind: BenchmarkKind, row: pd.Series, image_cells: dict) -> Question:
    def error(field: str, problem: str) -> VlaflowError:
        return VlaflowError(f"{tsv_path}: row index {row['index']}: {field}: {problem}")

    return kind.question(benchmark, row, _images(row["image"], image_cells, error), error)


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
                for part in benchmark.prompt(question)
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
    kinds: dict[str, str] | None = None,
) -> dict:
    """Answer and score each benchmark `$LMUData/<NAME>.tsv` (its first `limit` rows when given) as
    the kind `kinds` declares for it, else the kind its name implies (`benchmark_kind`); write the
    new folder `out` and return its summary. Every TSV is checked before the model loads."""
    for setting, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        if value is not None and value < 1:
            raise VlaflowError(f"{setting}={value}: must be at least 1")
    if not benchmarks:
        raise VlaflowError("no benchmark named; name at least one, e.g. EasyVQA or MMStar")
    kinds = kinds or {}
    undeclared = [name for name in kinds if name not in benchmarks]
    if undeclared:
        raise VlaflowError(f"kinds: {undeclared[0]!r} is not among the benchmarks {list(benchmarks)}")
    model_dir = Path(model_dir)
    model_name = model_dir.resolve().name
    summary = {}
    with atomic_directory(Path(out)) as staging:
        read = [
            read_benchmark(Path(lmudata) / f"{name}.tsv", kind=kinds.get(name), limit=limit)
            for name in dict.fromkeys(benchmarks)
        ]
        model, processor = load_vl_model(model_dir)
        for benchmark in read:
            predictions = answer_benchmark(
                model, processor, benchmark, batch_size=batch_size, max_new_tokens=max_new_tokens
            )
            stem = staging / f"{model_name}_{benchmark.name}"
            scored = score_benchmark(benchmark, predictions, stem.with_name(stem.name + ".xlsx"))
            write_verdicts(stem.with_name(stem.name + "_verdicts.tsv"), scored.rows)
            write_accuracy_table(stem.with_name(stem.name + "_acc.csv"), scored.table)
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


def score_benchmark(benchmark: Benchmark, predictions: list[str], prediction_file: Path) -> Scored:
    """Write VLMEvalKit's prediction file and score what VLMEvalKit reads back from it."""
    write_prediction_file(prediction_file, benchmark.rows, predictions)
    read_back = read_prediction_file(prediction_file)
    return benchmark.kind.score(benchmark.name, read_back, benchmark.rows)


def benchmark_summary(benchmark: Benchmark, scored: Scored) -> dict:
    table = [{str(name): None if pd.isna(value) else value for name, value in row.items()} for row in scored.table]
    return {
        "kind": benchmark.kind.name,
        **pooled_accuracy(scored.rows),
        "chance": benchmark.kind.chance(benchmark.name, benchmark.questions, benchmark.rows),
        "vlmevalkit": table,
    }


def vqa_metrics(summary: dict) -> dict[str, float]:
    """The generic metrics of a benchmark: the pooled accuracy, chance, and VLMEvalKit's table,
    each cell named by its column, and "<column> (<split>)" in a table with a row per split."""
    metrics = {"accuracy": summary["overall"], "chance": summary["chance"]}
    for row in summary["vlmevalkit"]:
        split = f" ({row['split']})" if "split" in row else ""
        metrics |= {f"{column}{split}": value for column, value in row.items() if column != "split"}
    return metrics


def write_verdicts(path: Path, scored: pd.DataFrame) -> None:
    columns = ["index", "GT", "prediction", "extracted", "hit"]
    columns += [group for group in ("split", "category", "l2-category") if group in scored]
    scored[columns].to_csv(path, sep="\t", index=False)
