"""`vlaflow report`: one page (HTML, and a Markdown twin) on a whole recipe run: the forgetting
table, which lines up VQA accuracy (beside chance) and robot metrics (beside two trivial policies)
after each stage (also as `forgetting.csv`), a plot of VQA accuracy against robot error per arm,
the evaluation tables (each evaluation's generic `metrics.json`, laid out without knowing the
evaluation), loss curves per stage and the first rollout of each policy on each simulator task.
It shows what was measured; a stage that was not evaluated on something shows a dash."""

import html
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from vlaflow.errors import VlaflowError
from vlaflow.evaluation import metrics as evaluation_metrics
from vlaflow.fs import atomic_directory
from vlaflow.training.checkpoints import METRICS_FILE

VQA_SUMMARY = "vqa_summary.json"
OPEN_LOOP = "open_loop.json"
CLOSED_LOOP = "closed_loop_{task}.json"
ROLLOUT = "rollout_{task}.gif"
# Written before one closed loop per task: of the task the result names, else of LEGACY_TASK, the
# only task then.
LEGACY_CLOSED_LOOP = "closed_loop.json"
LEGACY_ROLLOUT = "rollout.gif"
LEGACY_TASK = "transfer_cube"
SKILL_PLOT = "vqa_vs_robot_error.png"
LOSS_PARTS = ("loss", "action_loss", "reasoning_loss", "vl_loss", "text_only_loss")
DASH = "—"


@dataclass(frozen=True)
class Run:
    """One trained model of the recipe: its label (vlm, stage1, ...), its folder (None if not at
    hand) and the folders its evaluations wrote (VQA, robot), searched in order."""

    label: str
    model: Path | None
    evaluations: tuple[Path, ...] = ()

    def find(self, name: str) -> Path | None:
        return next((folder / name for folder in self.evaluations if (folder / name).exists()), None)

    def read(self, name: str) -> dict | None:
        path = self.find(name)
        return None if path is None else _read_json(path)

    def _closed_loop_files(self) -> dict[str, Path]:
        """Each task's closed-loop result, by task name in order, from the first folder holding one."""
        prefix, suffix = CLOSED_LOOP.split("{task}")
        files = {}
        for folder in self.evaluations:
            for path in sorted(folder.glob(CLOSED_LOOP.format(task="*"))):
                files.setdefault(path.name.removeprefix(prefix).removesuffix(suffix), path)
            legacy = folder / LEGACY_CLOSED_LOOP
            if legacy.is_file():
                files.setdefault(_read_json(legacy).get("task", LEGACY_TASK), legacy)
        return dict(sorted(files.items()))

    def closed_loops(self) -> dict[str, dict]:
        """The closed-loop results by task, in order of task name."""
        return {task: _read_json(path) for task, path in self._closed_loop_files().items()}

    def rollout(self, task: str) -> Path | None:
        """The video of a task's first closed-loop episode, from the folder of the result it belongs
        to, so that the result can describe it; None where videos were off."""
        result = self._closed_loop_files().get(task)
        if result is None:
            return None
        video = result.parent / (LEGACY_ROLLOUT if result.name == LEGACY_CLOSED_LOOP else ROLLOUT.format(task=task))
        return video if video.exists() else None

    def metrics(self) -> dict[str, dict[str, float]]:
        """Every evaluation's generic metrics (`metrics.json` of each evaluation folder)."""
        merged = {}
        for folder in self.evaluations:
            if (folder / evaluation_metrics.METRICS_FILE).is_file():
                merged |= _read_json(folder / evaluation_metrics.METRICS_FILE)
        return merged


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise VlaflowError(f"{path}: not valid JSON ({error.msg})") from None


def _curve(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    curve = {part: [] for part in LOSS_PARTS}
    for line in metrics.read_text().splitlines():
        entry = json.loads(line)
        for part in LOSS_PARTS:
            if part in entry:
                curve[part].append((entry["step"], entry[part]))
    return {part: points for part, points in curve.items() if points and any(value for _, value in points)}


def plot_losses(metrics: Path, out: Path, title: str) -> bool:
    curve = _curve(metrics)
    if not curve:
        return False
    figure = Figure(figsize=(6, 3.5), dpi=100)  # no pyplot: no display backend, no global state
    axes = figure.add_subplot()
    for part, points in curve.items():
        steps, values = zip(*points)
        axes.plot(steps, values, label=part, linewidth=2 if part == "loss" else 1)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out)
    return True


def _number(value, digits: int = 3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def _reference_mse(open_loop: dict, policy: str) -> float | None:
    """The open-loop MSE of a trivial policy (`hold_state`, `mean_action`) on the same steps."""
    return open_loop.get("reference", {}).get(policy, {}).get("mse")


def _benchmarks(runs: list[Run]) -> list[str]:
    return sorted({name for run in runs for name in (run.read(VQA_SUMMARY) or {})})


def _chance(runs: list[Run], benchmark: str) -> float | None:
    """A benchmark's chance accuracy, as its evaluations measured it (the same questions for every run)."""
    return next(
        (
            summary[benchmark]["chance"]
            for summary in (run.read(VQA_SUMMARY) or {} for run in runs)
            if "chance" in summary.get(benchmark, {})
        ),
        None,
    )


def _tasks(runs: list[Run]) -> list[str]:
    """The simulator tasks any run was evaluated on in closed loop."""
    return sorted({task for run in runs for task in run.closed_loops()})


def forgetting_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    benchmarks, tasks = _benchmarks(runs), _tasks(runs)
    header = ["after", *[f"{name} accuracy" for name in benchmarks]]
    header += ["open-loop MSE", "hold state", "mean action", "open-loop L1"]
    header += [f"{task} {measure}" for task in tasks for measure in ("success rate", "mean max reward")]
    rows = []
    for run in runs:
        vqa, open_loop, closed_loops = run.read(VQA_SUMMARY) or {}, run.read(OPEN_LOOP) or {}, run.closed_loops()
        row = [run.label, *[_percent(vqa.get(name, {}).get("overall")) for name in benchmarks]]
        row += [_number(open_loop.get("mse"), 4)]
        row += [_number(_reference_mse(open_loop, policy), 4) for policy in ("hold_state", "mean_action")]
        row += [_number(open_loop.get("l1"), 4)]
        for task in tasks:
            closed_loop = closed_loops.get(task, {})
            row += [_percent(closed_loop.get("success_rate")), _number(closed_loop.get("mean_max_reward"), 2)]
        rows.append(row)
    chances = [_chance(runs, name) for name in benchmarks]
    if any(chance is not None for chance in chances):
        rows.append(["chance", *map(_percent, chances), *[DASH] * (len(header) - 1 - len(benchmarks))])
    return header, rows


def _mean_accuracy(run: Run) -> float | None:
    accuracies = [summary["overall"] for summary in (run.read(VQA_SUMMARY) or {}).values() if "overall" in summary]
    return sum(accuracies) / len(accuracies) if accuracies else None


def plot_skill(runs: list[Run], out: Path) -> bool:
    """VQA accuracy against open-loop robot error, one point per arm that has both; arms with VQA
    alone (the VLM before robot training) and chance as horizontal lines, the trivial policies'
    errors as vertical ones. Up and to the left is better at both."""
    points = [(run.label, _mean_accuracy(run), (run.read(OPEN_LOOP) or {}).get("mse")) for run in runs]
    if not any(accuracy is not None and mse is not None for _, accuracy, mse in points):
        return False
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    for label, accuracy, mse in points:
        if accuracy is not None and mse is not None:
            axes.scatter([mse], [100 * accuracy], s=50, zorder=3)
            axes.annotate(label, (mse, 100 * accuracy), textcoords="offset points", xytext=(6, 4))
        elif accuracy is not None:
            axes.axhline(100 * accuracy, linestyle="--", color="tab:gray", linewidth=1)
            axes.annotate(f"{label} (no robot error)", (0, 100 * accuracy), xycoords=("axes fraction", "data"),
                          xytext=(4, 3), textcoords="offset points", fontsize=8, color="tab:gray")
    chances = [chance for chance in (_chance(runs, name) for name in _benchmarks(runs)) if chance is not None]
    if chances:
        level = 100 * sum(chances) / len(chances)
        axes.axhline(level, linestyle=":", color="tab:red", linewidth=1)
        axes.annotate("chance", (0, level), xycoords=("axes fraction", "data"), xytext=(4, 3),
                      textcoords="offset points", fontsize=8, color="tab:red")
    open_loops = (run.read(OPEN_LOOP) or {} for run in runs)
    reference = next((open_loop["reference"] for open_loop in open_loops if "reference" in open_loop), {})
    for policy, name in (("hold_state", "hold state"), ("mean_action", "mean action")):
        if "mse" in reference.get(policy, {}):
            axes.axvline(reference[policy]["mse"], linestyle=":", color="tab:blue", linewidth=1)
            axes.annotate(name, (reference[policy]["mse"], 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                          textcoords="offset points", fontsize=8, color="tab:blue", rotation=90)
    axes.set_xlabel("open-loop action MSE (lower is better)")
    axes.set_ylabel("VQA accuracy, % (higher is better)")
    axes.set_ylim(0, 100)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    axes.set_title("What each arm keeps and learns")
    figure.tight_layout()
    figure.savefig(out)
    return True


FORGETTING_CSV_COLUMNS = (
    "arm",
    "vqa_accuracy",
    "open_loop_mse",
    "open_loop_mse_hold",
    "open_loop_mse_mean",
)


def forgetting_csv(runs: list[Run]) -> str:
    """The forgetting table for machines: accuracies and rates as fractions, an empty cell where
    nothing was measured; `vqa_accuracy` is the mean overall accuracy of the run's benchmarks, then
    `success_rate_<task>` and `mean_max_reward_<task>` for each simulator task, in order of name."""
    tasks = _tasks(runs)
    task_columns = [f"{measure}_{task}" for task in tasks for measure in ("success_rate", "mean_max_reward")]
    lines = [",".join([*FORGETTING_CSV_COLUMNS, *task_columns])]
    for run in runs:
        open_loop, closed_loops = run.read(OPEN_LOOP) or {}, run.closed_loops()
        values = [
            _mean_accuracy(run),
            open_loop.get("mse"),
            _reference_mse(open_loop, "hold_state"),
            _reference_mse(open_loop, "mean_action"),
        ]
        for task in tasks:
            closed_loop = closed_loops.get(task, {})
            values += [closed_loop.get("success_rate"), closed_loop.get("mean_max_reward")]
        lines.append(",".join([run.label, *("" if value is None else repr(float(value)) for value in values)]))
    return "\n".join(lines) + "\n"


def metrics_detail(runs: list[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per evaluation in the runs' `metrics.json` (a benchmark, an open- or closed-loop
    robot evaluation), a row per metric and a column per run, whatever the evaluation was."""
    metrics = {run.label: run.metrics() for run in runs}
    evaluations = list(dict.fromkeys(name for by_run in metrics.values() for name in by_run))
    tables = []
    for evaluation in evaluations:
        names = list(dict.fromkeys(name for by_run in metrics.values() for name in by_run.get(evaluation, {})))
        rows = [[name, *[_metric(metrics[run.label].get(evaluation, {}).get(name)) for run in runs]] for name in names]
        tables.append((evaluation, ["", *[run.label for run in runs]], rows))
    return tables


def _metric(value) -> str:
    return DASH if value is None else f"{value:.4g}"


def _wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate: unlike the normal approximation it stays
    inside [0, 1] and is not a single point at 0 or 1 successes out of a few episodes."""
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _top_reward(closed_loop: dict) -> int:
    """The reward of a successful episode (older results did not record it)."""
    return closed_loop.get("success_reward", max(closed_loop.get("max_rewards") or [0]))


def closed_loop_detail(runs: list[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per simulator task of the closed-loop results with their spread: the success
    rate's 95% interval, the mean max reward's standard error, and how many episodes ended at each
    reward level."""
    closed_loops = {run.label: run.closed_loops() for run in runs}
    tables = []
    for task in _tasks(runs):
        loops = [(label, by_task[task]) for label, by_task in closed_loops.items() if task in by_task]
        top = max(_top_reward(loop) for _, loop in loops)
        levels = " / ".join(map(str, range(top + 1)))
        header = [
            "",
            "episodes",
            "success rate (95% interval)",
            "mean max reward ± s.e.",
            f"episodes by max reward {levels}",
        ]
        rows = []
        for label, loop in loops:
            rewards = loop["max_rewards"]
            low, high = _wilson_interval(round(loop["success_rate"] * len(rewards)), len(rewards))
            spread = statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else None
            row = [label, str(len(rewards)), f"{_percent(loop['success_rate'])} ({_percent(low)}–{_percent(high)})"]
            row.append(_number(loop["mean_max_reward"], 2) + (f" ± {_number(spread, 2)}" if spread is not None else ""))
            row.append(" / ".join(str(rewards.count(level)) for level in range(top + 1)))
            rows.append(row)
        tables.append((f"Closed loop ({task})", header, rows))
    return tables


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}figure{display:inline-block;margin:.5rem}"""


def write_report(runs: list[Run], out: Path, title: str = "vlaflow run") -> Path:
    """Write `report.html`, `report.md` and their pictures to the new folder `out`."""
    for run in runs:
        for folder in (run.model, *run.evaluations):
            if folder is not None and not folder.is_dir():
                raise VlaflowError(f"{folder}: no such folder (run '{run.label}')")
    with atomic_directory(Path(out)) as staging:
        curves, rollouts = [], []
        for run in runs:
            metrics = run.model / METRICS_FILE if run.model else None
            if metrics is not None and metrics.exists():
                name = f"loss_{run.label}.png"
                if plot_losses(metrics, staging / name, f"{run.label}: training losses"):
                    curves.append((run.label, name))
            for task, closed_loop in run.closed_loops().items():
                if (video := run.rollout(task)) is not None:
                    name = f"rollout_{run.label}_{task}.gif"
                    shutil.copyfile(video, staging / name)
                    rollouts.append((run.label, task, name, closed_loop))
        header, rows = forgetting_table(runs)
        details = closed_loop_detail(runs) + metrics_detail(runs)
        skill = SKILL_PLOT if plot_skill(runs, staging / SKILL_PLOT) else None
        (staging / "forgetting.csv").write_text(forgetting_csv(runs))
        (staging / "report.md").write_text(_markdown(title, header, rows, skill, details, curves, rollouts))
        (staging / "report.html").write_text(_html(title, header, rows, skill, details, curves, rollouts))
    return Path(out)


FORGETTING_NOTE = (
    "VQA accuracy and robot metrics after each stage. The baseline is plain robot fine-tuning of "
    "the VLM (one dense MLP, nothing frozen), what the recipe prevents: it shows how much a model "
    "trained on robot data alone forgets. Stage 1 trains on robot data with the vision-language "
    "expert frozen; stage 2 co-trains with vision-language data to win back what stage 1 lost. "
    "Chance is a random pick among each question's options. For scale, two trivial policies are "
    "scored on the same held-out steps: holding the current joint positions, and the training "
    "data's mean action."
)
SKILL_CAPTION = "VQA accuracy against open-loop robot error, per arm: up and to the left is better at both."


def _rollout_caption(label: str, task: str, closed_loop: dict) -> str:
    seeds = closed_loop.get("seeds") or [None]
    rewards = closed_loop.get("max_rewards") or [None]
    return f"{label}, {task}: first rollout (seed {seeds[0]}, max reward {rewards[0]} of {_top_reward(closed_loop)})"


def _markdown(title, header, rows, skill, details, curves, rollouts) -> str:
    parts = [f"# {title}", "## Forgetting table", FORGETTING_NOTE, _markdown_table(header, rows)]
    if skill:
        parts.append(f"![{SKILL_CAPTION}]({skill})")
    for name, detail_header, detail_rows in details:
        parts += [f"## {name}", _markdown_table(detail_header, detail_rows)]
    if curves:
        parts += ["## Training losses", *[f"![{label}]({name})" for label, name in curves]]
    if rollouts:
        parts.append("## Rollouts")
        parts += [f"![{_rollout_caption(label, task, loop)}]({name})" for label, task, name, loop in rollouts]
    return "\n\n".join(parts) + "\n"


def _html(title, header, rows, skill, details, curves, rollouts) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Forgetting table</h2>", f"<p>{html.escape(FORGETTING_NOTE)}</p>"]
    parts.append(_html_table(header, rows))
    if skill:
        caption = html.escape(SKILL_CAPTION)
        parts.append(f'<figure><img src="{skill}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    for name, detail_header, detail_rows in details:
        parts += [f"<h2>{html.escape(name)}</h2>", _html_table(detail_header, detail_rows)]
    if curves:
        parts.append("<h2>Training losses</h2>")
        parts += [f'<figure><img src="{name}" alt="{html.escape(label)}"></figure>' for label, name in curves]
    if rollouts:
        parts.append("<h2>Rollouts</h2>")
        for label, task, name, loop in rollouts:
            caption = html.escape(_rollout_caption(label, task, loop))
            parts.append(f'<figure><img src="{name}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    body = "\n".join(parts)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
