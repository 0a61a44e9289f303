"""Every evaluation's figures in one generic file beside its own: `metrics.json` in the output
folder, `{evaluation: {metric: value}}` with numbers only (a benchmark's accuracies, a robot task's
success rate). The report lays these out without knowing what the evaluation was, so a new
benchmark or simulator task shows up in it by writing its metrics here."""

import json
import math
from pathlib import Path

from vlaflow.fs import replaced_file

METRICS_FILE = "metrics.json"


def add_metrics(folder: Path, evaluation: str, metrics: dict[str, float | None]) -> dict:
    """Record `evaluation`'s metrics in `folder/metrics.json`, beside those other evaluations wrote
    there; a metric without a finite value is left out. Returns the file's content."""
    path = Path(folder) / METRICS_FILE
    recorded = read_metrics(path)
    recorded[evaluation] = {
        name: float(value) for name, value in metrics.items() if value is not None and math.isfinite(value)
    }
    with replaced_file(path) as staged:
        staged.write_text(json.dumps(recorded, indent=2) + "\n")
    return recorded


def read_metrics(path: Path) -> dict[str, dict[str, float]]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
