"""The registry of benchmark kinds `vlaflow eval vqa` reads, prompts and scores. A new kind is one
entry here and one `BenchmarkKind` subclass."""

from vlaflow.errors import VlaflowError
from vlaflow.evaluation.benchmark_kind import BenchmarkKind
from vlaflow.evaluation.exact_matching import MultipleChoice
from vlaflow.evaluation.yes_or_no import YesOrNo

BENCHMARK_KINDS: dict[str, BenchmarkKind] = {kind.name: kind for kind in (MultipleChoice(), YesOrNo())}
DEFAULT_KIND = MultipleChoice.name


def benchmark_kind(benchmark: str, declared: str | None = None) -> BenchmarkKind:
    """The kind a benchmark is read and scored as: the one the user declares, else the one whose
    VLMEvalKit datasets include its name, else multiple choice (as VLMEvalKit takes a TSV it does
    not know, with option columns, for a custom multiple-choice benchmark)."""
    if declared is not None:
        if declared not in BENCHMARK_KINDS:
            raise VlaflowError(f"{benchmark}: kind {declared!r} is not one of {', '.join(BENCHMARK_KINDS)}")
        return BENCHMARK_KINDS[declared]
    named = [kind for kind in BENCHMARK_KINDS.values() if benchmark in kind.vlmevalkit_datasets]
    return named[0] if named else BENCHMARK_KINDS[DEFAULT_KIND]
