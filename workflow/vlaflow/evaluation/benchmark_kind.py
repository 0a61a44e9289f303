"""A kind of VLMEvalKit benchmark: how its rows are checked, how a question is put to the model and
how the answers are scored, each as VLMEvalKit does it for that kind; and the files every kind
shares, VLMEvalKit's prediction file and accuracy table. The kinds are registered in
`vlaflow.evaluation.benchmarks.BENCHMARK_KINDS`; adding one is an entry there and a subclass of
`BenchmarkKind`, as `exact_matching.MultipleChoice` and `yes_or_no.YesOrNo` are."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from vlaflow.errors import VlaflowError

RowError = Callable[[str, str], VlaflowError]  # (field, problem) -> the error naming the file and row


@dataclass(frozen=True)
class Question:
    """One benchmark row as VLMEvalKit reads it: cells keep pandas' types (a number stays a number,
    a missing cell is NaN)."""

    index: int
    images: tuple[str, ...]  # base64, shared images resolved
    question: object
    hint: object | None
    options: dict[str, object]  # shown in the prompt; none for a yes-or-no question
    answer: str  # the ground truth VLMEvalKit scores against

    def image_parts(self) -> list[dict]:
        """`ImageBaseDataset.build_prompt`'s opening: each image, in order, before the text."""
        return [{"type": "image", "value": image} for image in self.images]


@dataclass(frozen=True)
class Scored:
    """The scored rows (one per question; for a circular benchmark one per rotated set, its main
    row), with `GT`, `extracted` (what was read from the answer, or "") and `hit` (1/0), VLMEvalKit's
    table (a list of rows, each a {column: value} dict), and every prediction-file row with what was
    read from it."""

    rows: pd.DataFrame
    table: list[dict]
    answers: pd.DataFrame


class BenchmarkKind(ABC):
    """One kind of benchmark, e.g. multiple choice. A benchmark is of the kind whose
    `vlmevalkit_datasets` names it (VLMEvalKit chooses its dataset class by name), else of the kind
    the user names for it, else multiple choice."""

    name: ClassVar[str]
    vlmevalkit_datasets: ClassVar[tuple[str, ...]] = ()

    def check_rows(self, tsv_path: Path, benchmark: str, rows: pd.DataFrame) -> None:
        """Refuse a table this kind cannot score (a column its table needs), before any question."""

    @abstractmethod
    def question(self, benchmark: str, row: pd.Series, images: tuple[str, ...], error: RowError) -> Question:
        """The question of one row, its answer checked."""

    @abstractmethod
    def prompt(self, benchmark: str, question: Question) -> list[dict]:
        """VLMEvalKit's message: `{"type": "image" | "text", "value": ...}` parts in its order."""

    @abstractmethod
    def score(self, benchmark: str, predictions: pd.DataFrame, rows: pd.DataFrame) -> Scored:
        """VLMEvalKit's offline scoring (`evaluate(..., model="exact_matching")`) of a prediction file
        as pandas reads it back, against the benchmark's rows."""

    @abstractmethod
    def chance(self, benchmark: str, questions: list[Question], rows: pd.DataFrame) -> float:
        """The pooled accuracy of answering every question at random."""


def write_prediction_file(path: Path, rows: pd.DataFrame, predictions: list[str]) -> None:
    """VLMEvalKit's `<model>_<NAME>.xlsx`: the benchmark's rows without their images, and the answers."""
    frame = rows.drop(columns=["image"], errors="ignore").copy()
    frame["prediction"] = [str(prediction) for prediction in predictions]
    frame.to_excel(path, index=False, engine="xlsxwriter")


def read_prediction_file(path: Path) -> pd.DataFrame:
    """A prediction file as VLMEvalKit's `load` reads it (`.xlsx`, or `.tsv` when PRED_FORMAT=tsv)."""
    path = Path(path)
    return pd.read_csv(path, sep="\t") if path.suffix == ".tsv" else pd.read_excel(path)


def write_accuracy_table(path: Path, table: list[dict]) -> None:
    """`<model>_<NAME>_acc.csv` as VLMEvalKit dumps it."""
    pd.DataFrame(table).to_csv(path, index=False, encoding="utf-8", quoting=1)  # csv.QUOTE_ALL


def pooled_accuracy(scored: pd.DataFrame) -> dict:
    """vlaflow's own summary beside VLMEvalKit's table: accuracy over all scored rows and per split,
    category and l2-category across splits."""
    summary = {"overall": float(scored["hit"].mean()), "total": len(scored)}
    for group in ("split", "category", "l2-category"):
        if group in scored:
            summary[group] = {str(name): float(hits.mean()) for name, hits in scored.groupby(group)["hit"]}
    return summary
