"""VLMEvalKit's yes-or-no benchmarks (`ImageYORNDataset`: MME, POPE, AMBER, VSR-zeroshot and any
benchmark the user declares of this kind), scored offline ("exact matching", no judge model) rule
for rule; `tests/test_vlmevalkit_parity.py` compares them with the real package's.

- The prompt is the images, then the question's text; for the benchmark named exactly AMBER,
  "\\nPlease answer yes or no." follows.
- The answer read (`YOrN_Extraction`): the lower-cased prediction, its punctuation turned to spaces
  (or removed: `process_punctuation`, which removes at most 32 periods), split into words; "Yes" if
  "yes" is a word and "no" is not, "No" the other way round, else "Unknown" (a miss).
- A hit is the read answer equal to the ground truth, "Yes" or "No"; for a name containing AMBER,
  regardless of case.
- The table is chosen by the name, as VLMEvalKit's `listinstr` chooses it: MME's (per category, the
  accuracy plus "accuracy+", both questions on an image right, summed into perception and
  reasoning), POPE's (F1, accuracy, precision and recall, overall and per comma-separated
  category), AMBER's (accuracy per merged category and their mean), VSR-zeroshot's (precision,
  recall, accuracy, and F1 as a fraction), else the default (Overall, then per category and
  l2-category). HallusionBench's needs its string indices, which vlaflow's reader refuses.
"""

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlaflow.errors import VlaflowError
from vlaflow.evaluation.benchmark_kind import BenchmarkKind, Question, RowError, Scored

YES, NO, UNKNOWN = "Yes", "No", "Unknown"
AMBER_PROMPT_SUFFIX = "\nPlease answer yes or no."
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # process_punctuation's marks
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_PERIODS_REMOVED = re.UNICODE  # VLMEvalKit passes re.UNICODE (32) where `sub` takes its count
MME_SUPER_CATEGORIES = {
    "perception": (
        "OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene",
    ),
    "reasoning": ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"),
}  # fmt: skip
AMBER_CATEGORIES = {
    "discriminative-attribute-state": "Attribute",
    "discriminative-attribute-number": "Attribute",
    "discriminative-attribute-action": "Attribute",
    "discriminative-hallucination": "Existence",
    "discriminative-relation": "Relation",
    "relation": "Relation",
}


def process_punctuation(text: str) -> str:
    """VLMEvalKit's `process_punctuation`: each mark next to a space is removed (all are, once a
    digit-comma-digit appears), other marks become spaces; then periods not beside a digit go."""
    processed = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        processed = processed.replace(mark, "" if spaced or strip_all else " ")
    return _LONE_PERIOD.sub("", processed, _PERIODS_REMOVED)


def read_yes_or_no(prediction) -> str:
    """`YOrN_Extraction`: "Yes", "No" or "Unknown"."""
    words = process_punctuation(str(prediction).lower()).split()
    if "yes" in words and "no" not in words:
        return YES
    if "no" in words and "yes" not in words:
        return NO
    return UNKNOWN


def is_amber(benchmark: str) -> bool:
    return "AMBER" in benchmark


# --- the tables (`vlmeval.dataset.utils.yorn`) ---


def _percent(hits) -> float:
    return float(np.mean(hits) * 100)


def _sorted_values(tsv_column: pd.Series, column: str) -> list:
    values = [value for value in set(tsv_column) if not pd.isna(value)]
    try:
        return sorted(values)
    except TypeError:
        raise VlaflowError(f"{column}: mixes numbers and text, which VLMEvalKit cannot sort") from None


def default_table(scored: pd.DataFrame) -> list[dict]:
    """`default_rating`: Overall, then each category's and l2-category's accuracy (sorted; a later
    column of the same name overwrites an earlier one's value in its place)."""
    row = {"Overall": _percent(scored["hit"])}
    for group in ("category", "l2-category"):
        if group in scored:
            for value in _sorted_values(scored[group], group):
                row[value] = _percent(scored[scored[group] == value]["hit"])
    return [row]


def _hits_per_image(scored: pd.DataFrame, categories: pd.Series) -> dict:
    per_category = defaultdict(lambda: defaultdict(list))
    for category, image_path, hit in zip(categories, scored["image_path"], scored["hit"]):
        per_category[category][image_path].append(hit)
    return per_category


def mme_table(scored: pd.DataFrame) -> list[dict]:
    """`MME_rating`: per category (in order of appearance) its accuracy plus its accuracy+ (both
    questions on an image right, from the first two on each), the perception and reasoning sums first."""
    scores = {}
    for category, images in _hits_per_image(scored, scored["category"]).items():
        hits = [hit for image_hits in images.values() for hit in image_hits]
        both = [image_hits[0] * image_hits[1] for image_hits in images.values()]
        scores[category] = _percent(hits) + _percent(both)
    row = {
        name: sum((scores[category] for category in categories if category in scores), 0)
        for name, categories in MME_SUPER_CATEGORIES.items()
    }
    return [row | scores]


def _f1(truth: np.ndarray, read: np.ndarray) -> tuple[float, float, float]:
    true_positive = int(((truth == 1) & (read == 1)).sum())
    false_positive = int(((truth == 0) & (read == 1)).sum())
    false_negative = int(((truth == 1) & (read == 0)).sum())
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 0
    recall = true_positive / (true_positive + false_negative) if true_positive + false_negative else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    return f1, precision, recall


def _detection(scored: pd.DataFrame) -> dict:
    truth = np.array([1 if answer == YES else 0 for answer in scored["GT"]])
    read = np.array([1 if extracted == YES else 0 for extracted in scored["extracted"]])
    f1, precision, recall = _f1(truth, read)
    return {"f1": f1, "precision": precision * 100, "recall": recall * 100, "acc": _percent(scored["hit"])}


def pope_table(scored: pd.DataFrame) -> list[dict]:
    """`POPE_rating`: a row is counted once per comma-separated category it names; F1 (as Overall),
    accuracy, precision and recall for all rows, then per category."""
    exploded = scored.assign(category=scored["category"].str.split(",")).explode("category")
    rows = []
    for split in ["Overall", *_sorted_values(exploded["category"], "category")]:
        subset = exploded if split == "Overall" else exploded[exploded["category"] == split]
        figures = _detection(subset)
        rows.append(
            {
                "split": split,
                "Overall": figures["f1"] * 100,
                "acc": figures["acc"],
                "precision": figures["precision"],
                "recall": figures["recall"],
            }
        )
    return rows


def amber_table(scored: pd.DataFrame) -> list[dict]:
    """`AMBER_rating`: accuracy per category, AMBER's discriminative categories merged into
    Attribute, Existence and Relation (in order of appearance), then their mean as "Avg ACC"."""
    categories = scored["category"].map(lambda category: AMBER_CATEGORIES.get(category, category))
    row = {
        category: _percent([hit for image_hits in images.values() for hit in image_hits])
        for category, images in _hits_per_image(scored, categories).items()
    }
    return [row | {"Avg ACC": float(np.mean(list(row.values())))}]


def vsr_table(scored: pd.DataFrame) -> list[dict]:
    """`VSR_rating`: precision, recall and accuracy in percent, F1 as a fraction."""
    figures = _detection(scored)
    return [
        {
            "precision": figures["precision"],
            "recall": figures["recall"],
            "acc": figures["acc"],
            "f1_score": figures["f1"],
        }
    ]


@dataclass(frozen=True)
class YesOrNoTable:
    """A table VLMEvalKit lays out for a benchmark whose name contains `marker`."""

    marker: str
    rate: Callable[[pd.DataFrame], list[dict]] | None  # None: vlaflow cannot lay it out
    columns: tuple[str, ...] = ()  # the columns it needs besides the answers
    filled: bool = True  # whether they need a value in every row


TABLES = (  # VLMEvalKit's order of choice
    YesOrNoTable("MME", mme_table, ("category", "image_path")),
    YesOrNoTable("Hallusion", None),
    YesOrNoTable("POPE", pope_table, ("category",), filled=False),
    YesOrNoTable("AMBER", amber_table, ("category", "image_path")),
    YesOrNoTable("VSR-zeroshot", vsr_table),
)
DEFAULT_TABLE = YesOrNoTable("", default_table)  # its category and l2-category columns are optional


def table_for(benchmark: str) -> YesOrNoTable:
    """The table VLMEvalKit's `ImageYORNDataset.evaluate` chooses by the benchmark's name."""
    return next((table for table in TABLES if table.marker in benchmark), DEFAULT_TABLE)


# --- the benchmark kind ---


class YesOrNo(BenchmarkKind):
    """VLMEvalKit's `ImageYORNDataset`: a question answered Yes or No."""

    name = "yes_or_no"
    vlmevalkit_datasets = ("MME", "HallusionBench", "POPE", "AMBER", "VSR-zeroshot")

    def check_rows(self, tsv_path: Path, benchmark: str, rows: pd.DataFrame) -> None:
        table = table_for(benchmark)
        if table.rate is None:
            raise VlaflowError(
                f"{tsv_path}: {benchmark} is scored by VLMEvalKit's HallusionBench table, which reads string "
                "indices; vlaflow does not score it: answer it with VlaflowVLM inside VLMEvalKit"
            )
        for column in table.columns:
            if column not in rows:
                raise VlaflowError(f"{tsv_path}: no column {column!r} in the header ({table.rate.__name__} reads it)")
            empty = rows["index"][pd.isna(rows[column])]
            if table.filled and len(empty):
                raise VlaflowError(
                    f"{tsv_path}: row index {empty.iloc[0]}: {column}: empty ({table.rate.__name__} reads it)"
                )
        if table.rate is pope_table and not any(isinstance(cell, str) for cell in rows["category"]):
            # VLMEvalKit splits the cells at commas with pandas, which refuses a column without text
            raise VlaflowError(
                f"{tsv_path}: category: no text in the column (POPE's categories are comma-separated names)"
            )
        if table.rate is mme_table:
            questions_per_image = rows.groupby(["category", "image_path"]).size()
            single = questions_per_image[questions_per_image < 2]
            if len(single):
                category, image_path = single.index[0]
                raise VlaflowError(
                    f"{tsv_path}: image_path: {image_path!r} (category {category!r}) has one question among the rows "
                    "scored; MME asks two per image"
                )

    def question(self, benchmark: str, row: pd.Series, images: tuple[str, ...], error: RowError) -> Question:
        answer = row["answer"]
        accepted = (YES, NO) if not is_amber(benchmark) else ("yes", "no")
        if pd.isna(answer) or (str(answer).lower() if is_amber(benchmark) else str(answer)) not in accepted:
            raise error(
                "answer",
                f"{answer!r} is not {' or '.join(accepted)}"
                + ("" if is_amber(benchmark) else " (VLMEvalKit compares case-sensitively)"),
            )
        if pd.isna(row["question"]):
            raise error("question", "empty")
        return Question(row["index"], images, row["question"], None, {}, answer)

    def prompt(self, benchmark: str, question: Question) -> list[dict]:
        text = str(question.question) + (AMBER_PROMPT_SUFFIX if benchmark == "AMBER" else "")
        return [*question.image_parts(), {"type": "text", "value": text}]

    def score(self, benchmark: str, predictions: pd.DataFrame, rows: pd.DataFrame) -> Scored:
        """`ImageYORNDataset.evaluate(..., model="exact_matching")`."""
        answers = dict(zip(rows["index"], rows["answer"]))
        data = predictions[predictions["index"].isin(answers)].copy()
        data["prediction"] = [str(prediction) for prediction in data["prediction"]]
        data["GT"] = [answers[index] for index in data["index"]]
        data["extracted"] = [read_yes_or_no(prediction) for prediction in data["prediction"]]
        if is_amber(benchmark):
            hits = data["GT"].str.lower() == data["extracted"].str.lower()
        else:
            hits = data["GT"] == data["extracted"]
        data["hit"] = hits.astype(int)
        return Scored(data, table_for(benchmark).rate(data), data)

    def chance(self, benchmark: str, questions: list[Question], rows: pd.DataFrame) -> float:
        return 0.5
