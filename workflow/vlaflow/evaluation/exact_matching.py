"""VLMEvalKit's offline multiple-choice scoring ("exact matching", no judge model), rule for rule.

Published numbers come from VLMEvalKit (`ImageMCQDataset.evaluate_heuristic` with
`model="exact_matching"`), quirks included, so this module gives its verdicts and tables exactly;
`tests/test_vlmevalkit_parity.py` compares them with the real package's on an adversarial set.
What it reproduces:

- the prediction file: VLMEvalKit writes the benchmark's rows (without images) and the answers to
  `<model>_<NAME>.xlsx` with pandas and scores what pandas reads back, so an empty answer or
  "None" becomes `nan` (scored as the text "nan"), and a column of all-number answers becomes
  numbers ("4.50" is scored as "4.5");
- `can_infer`: an option letter among the last words, else exactly one option's text in the
  lower-cased answer, but only if the unstripped answer is at most twice as long as the option
  texts together (kept unstripped); refusals and a lone "Z" read as "none of the options", an answer
  holding "Failed to obtain answer via API" is read for option texts only;
- MMMU (name contains "MMMU"): an open question (no option A) is scored as A = its answer,
  B = "Other Answers", and an answer that is not a letter as A;
- circular evaluation for names containing MMBench, CCBench, circular or MMCR: the rows sharing a
  `g_index` (default: `index % 1e6`) are rotations of one question, which counts only if every
  rotation is answered right; the table counts the questions (rows with `index == g_index`);
- VLMEvalKit's VERBOSE mode, which reads a lone "A" among more than three words as a quantifier,
  is not followed: its default is off;
- the table (`report_acc`): one row per split (`none` without a split column), its Overall, then its
  accuracy per `l2-category` and per `category` value, MMBench's categories abbreviated (`CP`, ...);
  no pooled Overall across splits.
"""

import string
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from vlaflow.data.language import multiple_choice_prompt
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.benchmark_kind import BenchmarkKind, Question, RowError, Scored

OPTION_LETTERS = tuple(string.ascii_uppercase)
NONE_OF_THE_OPTIONS = "Z"
MMMU_OTHER_ANSWERS = "Other Answers"
MMMU_IMAGE_PLACEHOLDER = "<image "
API_FAILURE = "Failed to obtain answer via API"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
CIRCULAR_MARKERS = ("mmbench", "ccbench", "circular", "mmcr")
CIRCULAR_GROUP_OFFSET = 1e6
MMBENCH_ABBREVIATIONS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
TABLE_GROUPS = ("l2-category", "category")  # VLMEvalKit's order: a category overrides a same-named l2-category
NO_SPLIT = "none"
_PUNCTUATION_TO_SPACES = str.maketrans({character: " " for character in ".()[],:;!*#{}"})


def is_circular(benchmark: str) -> bool:
    return any(marker in benchmark.lower() for marker in CIRCULAR_MARKERS)


def is_mmmu(benchmark: str) -> bool:
    return "MMMU" in benchmark


def ground_truth(benchmark: str, answer):
    """The answer VLMEvalKit scores against: for MMMU (not circular), a non-letter answer is A."""
    if is_mmmu(benchmark) and not is_circular(benchmark):
        return answer if answer in OPTION_LETTERS else "A"
    return answer


def circular_groups(rows: pd.DataFrame) -> list[int]:
    """The rotated set of each row: its `g_index`, by default its index modulo 1e6."""
    if "g_index" in rows:
        return list(rows["g_index"])
    return [int(index % CIRCULAR_GROUP_OFFSET) for index in rows["index"]]


# --- reading an answer ---


def can_infer(prediction, choices: dict) -> str | None:
    """The letter VLMEvalKit reads from a prediction (`vlmeval.utils.can_infer`), "Z" for "none of
    the options", None when it reads nothing. `choices` maps letters to option cells as pandas read
    them (numbers stay numbers)."""
    prediction = str(prediction)
    return _option_letter(prediction, choices) or _option_text(prediction, choices)


def _option_letter(prediction: str, choices: dict) -> str | None:
    if API_FAILURE in prediction:
        return None
    if any(refusal in prediction for refusal in REFUSALS):
        return NONE_OF_THE_OPTIONS
    words = prediction.translate(_PUNCTUATION_TO_SPACES).split()
    named = [letter for letter in choices if letter in words]
    if len(named) == 1:
        # the letter's first occurrence must be one of the last four words
        return named[0] if words.index(named[0]) > len(words) - 5 else None
    if not named and NONE_OF_THE_OPTIONS in words:
        return NONE_OF_THE_OPTIONS
    return None


def _option_text(prediction: str, choices: dict) -> str | None:
    lowered = prediction.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    restated = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return restated[0] if len(restated) == 1 else None


def row_choices(row: pd.Series) -> dict:
    """The options of a prediction-file row (`build_choices`): letter columns with a value."""
    return {letter: row[letter] for letter in OPTION_LETTERS if letter in row and not pd.isna(row[letter])}


# --- scoring ---


def score_predictions(predictions: pd.DataFrame, benchmark_rows: pd.DataFrame, benchmark: str) -> Scored:
    """`ImageMCQDataset.evaluate(..., model="exact_matching")` on a prediction file read back
    (`read_prediction_file`), against the benchmark's rows as `read_benchmark` gives them."""
    data = predictions.copy()
    if is_circular(benchmark):
        data["index"] = [int(index) for index in data["index"]]
    data = data.sort_values(by="index")
    data["prediction"] = [str(prediction) for prediction in data["prediction"]]
    data.columns = [column if column in OPTION_LETTERS else column.lower() for column in data.columns]
    data = data.loc[:, ~data.columns.duplicated(keep="last")]
    answers = {
        index: ground_truth(benchmark, answer)
        for index, answer in zip(benchmark_rows["index"], benchmark_rows["answer"])
    }
    if is_mmmu(benchmark) and not is_circular(benchmark):
        data = _mmmu_open_questions(data)
    data = data[data["index"].isin(answers)].copy()
    data["GT"] = [answers[index] for index in data["index"]]
    data["extracted"] = [can_infer(row["prediction"], row_choices(row)) or "" for _, row in data.iterrows()]
    answers = data
    if is_circular(benchmark):
        data = _circular_hits(data.copy())
    else:
        data = data.assign(
            hit=[int((extracted or NONE_OF_THE_OPTIONS) == gt) for extracted, gt in zip(data["extracted"], data["GT"])]
        )
    return Scored(data, report_accuracy(data), answers)


def _mmmu_open_questions(data: pd.DataFrame) -> pd.DataFrame:
    data = data.copy()
    if "A" not in data or "B" not in data:
        return data  # VLMEvalKit fails here; a benchmark without options A and B has no open questions to turn
    open_question = [pd.isna(option) for option in data["A"]]
    data["A"] = [
        answer if is_open else option for option, answer, is_open in zip(data["A"], data["answer"], open_question)
    ]
    data["B"] = [MMMU_OTHER_ANSWERS if is_open else option for option, is_open in zip(data["B"], open_question)]
    return data


def _circular_hits(data: pd.DataFrame) -> pd.DataFrame:
    data["g_index"] = circular_groups(data)
    right = defaultdict(lambda: True)
    for group, extracted, gt in zip(data["g_index"], data["extracted"], data["GT"]):
        right[group] &= extracted == gt
    main = data[data["index"] == data["g_index"]].copy()
    main["hit"] = [int(right[index]) for index in main["index"]]
    return main


def report_accuracy(scored: pd.DataFrame) -> list[dict]:
    """VLMEvalKit's `report_acc`: per split (sorted; VLMEvalKit's order is a set's), `split`,
    `Overall`, then each l2-category's and category's accuracy (NaN where a split has none). As in
    VLMEvalKit, a category named like an earlier column replaces it in place, even `split` (whose
    values then select no rows for the columns after it)."""
    split_of = scored["split"] if "split" in scored else pd.Series([NO_SPLIT] * len(scored), index=scored.index)
    columns = {"split": sorted(set(split_of), key=str)}
    columns["Overall"] = [_mean(scored[split_of == split]["hit"]) for split in columns["split"]]
    for group in TABLE_GROUPS:
        if group not in scored:
            continue
        for value in sorted(set(scored[group])):
            in_group = scored[scored[group] == value]
            columns[MMBENCH_ABBREVIATIONS.get(value, value)] = [
                _mean(in_group[split_of[in_group.index] == split]["hit"]) for split in columns["split"]
            ]
    return [{name: values[row] for name, values in columns.items()} for row in range(len(columns["split"]))]


def _mean(hits: pd.Series) -> float:
    return float(np.mean(hits)) if len(hits) else float("nan")


# --- the benchmark kind ---


class MultipleChoice(BenchmarkKind):
    """VLMEvalKit's `ImageMCQDataset` (and `MMMUDataset` for a name containing "MMMU"): options in
    letter columns, the prompt `ImageMCQDataset.build_prompt` writes, the rules above."""

    name = "multiple_choice"

    def check_rows(self, tsv_path: Path, benchmark: str, rows: pd.DataFrame) -> None:
        for group in ("split", *TABLE_GROUPS):
            missing = (
                [index for index, cell in zip(rows["index"], rows[group]) if pd.isna(cell)] if group in rows else []
            )
            if missing:
                raise VlaflowError(
                    f"{tsv_path}: row index {missing[0]}: {group}: empty (VLMEvalKit's table needs a value in every row)"
                )

    def question(self, benchmark: str, row: pd.Series, images: tuple[str, ...], error: RowError) -> Question:
        options = row_choices(row)
        answer = row["answer"]
        if pd.isna(answer):
            raise error("answer", "empty")
        choices = options
        if is_mmmu(benchmark) and not is_circular(benchmark) and not options:
            choices = {"A": answer, "B": MMMU_OTHER_ANSWERS}
        truth = ground_truth(benchmark, answer)
        if truth not in choices:
            raise error("answer", f"{answer!r} is not the letter of one of the options {sorted(choices)}")
        hint = row["hint"] if "hint" in row and not pd.isna(row["hint"]) else None
        return Question(row["index"], images, row["question"], hint, options, truth)

    def prompt(self, benchmark: str, question: Question) -> list[dict]:
        """`ImageMCQDataset.build_prompt`: the images, then the text; for MMMU the images go where the
        question's `<image N>` placeholders put them (`MMMUDataset.split_MMMU`)."""
        text = multiple_choice_prompt(question.question, question.options, question.hint)
        message = [*question.image_parts(), {"type": "text", "value": text}]
        return _interleave_mmmu(question, message) if is_mmmu(benchmark) else message

    def score(self, benchmark: str, predictions: pd.DataFrame, rows: pd.DataFrame) -> Scored:
        return score_predictions(predictions, rows, benchmark)

    def chance(self, benchmark: str, questions: list[Question], rows: pd.DataFrame) -> float:
        """A random choice among each question's options (MMMU's open question: A or B); a circular
        benchmark's rotated set counts only if every rotation is guessed right."""
        choice_counts = [len(question.options) or 2 for question in questions]
        if not is_circular(benchmark):
            return sum(1 / count for count in choice_counts) / len(questions)
        odds = {}
        for group, count in zip(circular_groups(rows), choice_counts):
            odds[group] = odds.get(group, 1.0) / count
        main = [question.index for question in questions if question.index in odds]
        return sum(odds[index] for index in main) / len(main)


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
