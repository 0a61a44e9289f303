"""`vlaflow report`: the forgetting table, detail tables, loss curves and rollouts from real files."""

import json

import pytest
from PIL import Image

from tests.conftest import random_image
from vlaflow.cli import main
from vlaflow.errors import VlaflowError
from vlaflow.report import Run, closed_loop_detail, forgetting_table, metrics_detail, write_report


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_gif(path, seed=0):
    frames = [random_image(seed + number, (24, 32)) for number in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def vqa(overall, by_category):
    summary = {"overall": overall, "total": 10, "chance": 0.45, "split": {"test": overall}, "category": by_category}
    return {"EasyVQA": summary}


@pytest.fixture
def runs(tmp_path):
    """vlm: VQA only (no robot statistics); stage1 and stage2: everything on transfer cube, stage 2
    with a rollout."""
    runs = []
    for label, accuracy in (("vlm", 0.8), ("stage1", 0.4), ("stage2", 0.7)):
        model, vqa_folder, robot_folder = (tmp_path / label / part for part in ("model", "vqa", "robot"))
        model.mkdir(parents=True)
        steps = [{"step": step, "loss": 5.0 / step, "vl_loss": 4.0 / step, "action_loss": 0.0} for step in range(1, 6)]
        (model / "metrics.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in steps))
        write_json(vqa_folder / "vqa_summary.json", vqa(accuracy, {"color": accuracy, "shape": 1 - accuracy}))
        metrics = {"accuracy": accuracy, "chance": 0.45, "Overall (test)": accuracy, "shape (test)": 1 - accuracy}
        write_json(vqa_folder / "metrics.json", {"EasyVQA": metrics})
        if label == "vlm":
            runs.append(Run(label, model, (vqa_folder,)))  # no robot statistics: no robot evaluation
            continue
        closed_loop = {
            "task": "transfer_cube",
            "success_reward": 4,
            "success_rate": 0.5,
            "mean_max_reward": 2.5,
            "seeds": [7, 8, 9, 10],
            "max_rewards": [4, 0, 2, 4],
        }
        reference = {"hold_state": {"mse": 0.25}, "mean_action": {"mse": 0.5}}
        write_json(robot_folder / "open_loop.json", {"mse": 0.0123, "l1": 0.0456, "reference": reference})
        write_json(robot_folder / "closed_loop_transfer_cube.json", closed_loop)
        write_json(robot_folder / "metrics.json", {"closed loop (insertion)": {"success rate": 0.5, "episodes": 4}})
        runs.append(Run(label, model, (vqa_folder, robot_folder)))
    write_gif(tmp_path / "stage2/robot/rollout_transfer_cube.gif")
    return runs


def test_forgetting_table_lines_up_each_stage_and_shows_dashes_for_what_was_not_measured(runs):
    header, rows = forgetting_table(runs)
    assert header == [
        "after",
        "EasyVQA accuracy",
        "open-loop MSE",
        "hold state",
        "mean action",
        "open-loop L1",
        "transfer_cube success rate",
        "transfer_cube mean max reward",
    ]
    assert rows == [
        ["vlm", "80.0%", "—", "—", "—", "—", "—", "—"],
        ["stage1", "40.0%", "0.0123", "0.2500", "0.5000", "0.0456", "50.0%", "2.50"],
        ["stage2", "70.0%", "0.0123", "0.2500", "0.5000", "0.0456", "50.0%", "2.50"],
        ["chance", "45.0%", "—", "—", "—", "—", "—", "—"],
    ]


def test_closed_loop_results_come_with_their_spread_and_per_episode_distribution(runs):
    [(name, header, rows)] = closed_loop_detail(runs)
    assert name == "Closed loop (transfer_cube)"
    assert header == [
        "",
        "episodes",
        "success rate (95% interval)",
        "mean max reward ± s.e.",
        "episodes by max reward 0 / 1 / 2 / 3 / 4",
    ]
    # 2 of 4: Wilson's 95% interval is 15.0%-85.0%; the rewards 4, 0, 2, 4 have s.e. sqrt(11/3)/2
    assert rows == [
        ["stage1", "4", "50.0% (15.0%–85.0%)", "2.50 ± 0.96", "1 / 0 / 1 / 0 / 2"],
        ["stage2", "4", "50.0% (15.0%–85.0%)", "2.50 ± 0.96", "1 / 0 / 1 / 0 / 2"],
    ]


def test_a_success_rate_of_zero_or_one_still_has_an_interval(runs):
    loop_file = runs[1].find("closed_loop_transfer_cube.json")
    loop_file.write_text(json.dumps({"success_rate": 0.0, "mean_max_reward": 1.0, "max_rewards": [1, 1, 1]}))
    [(_, header, rows)] = closed_loop_detail(runs[:2])
    # results written before success_reward was recorded: the levels go up to the highest reached
    assert header[-1] == "episodes by max reward 0 / 1"
    assert rows == [["stage1", "3", "0.0% (0.0%–56.2%)", "1.00 ± 0.00", "0 / 3"]]


def test_forgetting_csv_has_one_row_per_arm_with_fractions_and_empty_cells(runs, tmp_path):
    write_report(runs, tmp_path / "report")
    lines = (tmp_path / "report" / "forgetting.csv").read_text().splitlines()
    assert lines == [
        "arm,vqa_accuracy,open_loop_mse,open_loop_mse_hold,open_loop_mse_mean,"
        "success_rate_transfer_cube,mean_max_reward_transfer_cube",
        "vlm,0.8,,,,,",
        "stage1,0.4,0.0123,0.25,0.5,0.5,2.5",
        "stage2,0.7,0.0123,0.25,0.5,0.5,2.5",
    ]


def test_report_command_writes_html_markdown_curves_and_rollout(runs, tmp_path, capsys):
    arguments = ["report", "--out", str(tmp_path / "report"), "--title", "tiny run"]
    for run in runs:
        arguments += ["--run", run.label, str(run.model), *map(str, run.evaluations)]
    assert main(arguments) == 0
    out = tmp_path / "report"
    assert sorted(path.name for path in out.iterdir()) == [
        "forgetting.csv", "loss_stage1.png", "loss_stage2.png", "loss_vlm.png", "report.html", "report.md",
        "rollout_stage2_transfer_cube.gif", "vqa_vs_robot_error.png",
    ]  # fmt: skip
    with Image.open(out / "vqa_vs_robot_error.png") as image:
        assert image.size == (600, 400)
    for curve in out.glob("loss_*.png"):
        with Image.open(curve) as image:
            assert image.size == (600, 350)
    markdown = (out / "report.md").read_text()
    assert "| stage1 | 40.0% | 0.0123 | 0.2500 | 0.5000 | 0.0456 | 50.0% | 2.50 |" in markdown
    assert "## EasyVQA" in markdown and "| shape (test) | 0.2 | 0.6 | 0.3 |" in markdown
    assert "| chance | 0.45 | 0.45 | 0.45 |" in markdown
    assert "## closed loop (insertion)" in markdown and "| success rate | — | 0.5 | 0.5 |" in markdown
    assert "](vqa_vs_robot_error.png)" in markdown
    assert "## Closed loop (transfer_cube)" in markdown
    assert "| stage2 | 4 | 50.0% (15.0%–85.0%) | 2.50 ± 0.96 |" in markdown
    caption = "stage2, transfer_cube: first rollout (seed 7, max reward 4 of 4)"
    assert f"![{caption}](rollout_stage2_transfer_cube.gif)" in markdown
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<td>70.0%</td>" in page and 'src="loss_vlm.png"' in page


def test_a_run_evaluated_on_two_tasks_has_columns_tables_and_rollouts_for_each(runs, tmp_path):
    insertion = {
        "task": "insertion",
        "success_reward": 4,
        "success_rate": 0.0,
        "mean_max_reward": 1.75,
        "seeds": [7, 8, 9, 10],
        "max_rewards": [3, 1, 1, 2],
    }
    robot_folder = runs[2].evaluations[1]
    write_json(robot_folder / "closed_loop_insertion.json", insertion)
    write_gif(robot_folder / "rollout_insertion.gif", seed=5)
    header, rows = forgetting_table(runs)
    assert header[6:] == [
        "insertion success rate",
        "insertion mean max reward",
        "transfer_cube success rate",
        "transfer_cube mean max reward",
    ]
    assert [row[6:] for row in rows] == [
        ["—", "—", "—", "—"],
        ["—", "—", "50.0%", "2.50"],
        ["0.0%", "1.75", "50.0%", "2.50"],
        ["—", "—", "—", "—"],
    ]
    (insertion_name, _, insertion_rows), (transfer_name, _, transfer_rows) = closed_loop_detail(runs)
    assert (insertion_name, transfer_name) == ("Closed loop (insertion)", "Closed loop (transfer_cube)")
    assert insertion_rows == [["stage2", "4", "0.0% (0.0%–49.0%)", "1.75 ± 0.48", "0 / 2 / 1 / 1 / 0"]]
    assert [row[0] for row in transfer_rows] == ["stage1", "stage2"]

    write_report(runs, tmp_path / "report")
    out = tmp_path / "report"
    assert (out / "forgetting.csv").read_text().splitlines() == [
        "arm,vqa_accuracy,open_loop_mse,open_loop_mse_hold,open_loop_mse_mean,"
        "success_rate_insertion,mean_max_reward_insertion,success_rate_transfer_cube,mean_max_reward_transfer_cube",
        "vlm,0.8,,,,,,,",
        "stage1,0.4,0.0123,0.25,0.5,,,0.5,2.5",
        "stage2,0.7,0.0123,0.25,0.5,0.0,1.75,0.5,2.5",
    ]
    assert sorted(path.name for path in out.glob("rollout_*.gif")) == [
        "rollout_stage2_insertion.gif",
        "rollout_stage2_transfer_cube.gif",
    ]
    assert (out / "rollout_stage2_insertion.gif").read_bytes() == (robot_folder / "rollout_insertion.gif").read_bytes()
    markdown = (out / "report.md").read_text()
    assert [line for line in markdown.splitlines() if "first rollout" in line] == [
        "![stage2, insertion: first rollout (seed 7, max reward 3 of 4)](rollout_stage2_insertion.gif)",
        "![stage2, transfer_cube: first rollout (seed 7, max reward 4 of 4)](rollout_stage2_transfer_cube.gif)",
    ]
    page = (out / "report.html").read_text()
    assert "<h2>Closed loop (insertion)</h2>" in page
    assert '<img src="rollout_stage2_insertion.gif" alt="stage2, insertion: first rollout' in page


def test_results_from_before_one_closed_loop_per_task_are_read_as_their_task(runs, tmp_path):
    stage1_folder, stage2_folder = runs[1].evaluations[1], runs[2].evaluations[1]
    # transfer cube was the only task when the result did not name one
    untitled = json.loads((stage1_folder / "closed_loop_transfer_cube.json").read_text())
    del untitled["task"]
    write_json(stage1_folder / "closed_loop.json", untitled)
    (stage1_folder / "closed_loop_transfer_cube.json").unlink()
    write_gif(stage1_folder / "rollout.gif")
    insertion = json.loads((stage2_folder / "closed_loop_transfer_cube.json").read_text()) | {"task": "insertion"}
    write_json(stage2_folder / "closed_loop.json", insertion)
    (stage2_folder / "closed_loop_transfer_cube.json").unlink()
    (stage2_folder / "rollout_transfer_cube.gif").rename(stage2_folder / "rollout.gif")

    assert runs[1].closed_loops() == {"transfer_cube": untitled}
    assert runs[2].closed_loops() == {"insertion": insertion}
    assert runs[1].rollout("transfer_cube") == stage1_folder / "rollout.gif"
    assert runs[2].rollout("insertion") == stage2_folder / "rollout.gif"
    assert runs[2].rollout("transfer_cube") is None
    assert [name for name, _, _ in closed_loop_detail(runs)] == [
        "Closed loop (insertion)",
        "Closed loop (transfer_cube)",
    ]

    write_report(runs, tmp_path / "report")
    out = tmp_path / "report"
    assert sorted(path.name for path in out.glob("rollout_*.gif")) == [
        "rollout_stage1_transfer_cube.gif",
        "rollout_stage2_insertion.gif",
    ]
    markdown = (out / "report.md").read_text()
    assert "| stage1 | 40.0% | 0.0123 | 0.2500 | 0.5000 | 0.0456 | — | — | 50.0% | 2.50 |" in markdown
    assert "| stage2 | 70.0% | 0.0123 | 0.2500 | 0.5000 | 0.0456 | 50.0% | 2.50 | — | — |" in markdown
    assert [line for line in markdown.splitlines() if "first rollout" in line] == [
        "![stage1, transfer_cube: first rollout (seed 7, max reward 4 of 4)](rollout_stage1_transfer_cube.gif)",
        "![stage2, insertion: first rollout (seed 7, max reward 4 of 4)](rollout_stage2_insertion.gif)",
    ]


def test_an_evaluation_the_report_does_not_know_is_laid_out_from_its_metrics(runs, tmp_path):
    write_json(runs[1].evaluations[0] / "metrics.json", {"RefCOCO": {"IoU@0.5": 0.123456, "boxes": 812}})
    (table,) = [table for table in metrics_detail(runs) if table[0] == "RefCOCO"]
    assert table == (
        "RefCOCO",
        ["", "vlm", "stage1", "stage2"],
        [["IoU@0.5", "—", "0.1235", "—"], ["boxes", "—", "812", "—"]],
    )
    write_report(runs, tmp_path / "report")
    assert "| IoU@0.5 | — | 0.1235 | — |" in (tmp_path / "report" / "report.md").read_text()


def test_without_an_arm_that_has_both_measures_there_is_no_accuracy_error_plot(runs, tmp_path):
    write_report(runs[:1], tmp_path / "report")  # the VLM alone: VQA, no robot error
    assert not (tmp_path / "report" / "vqa_vs_robot_error.png").exists()
    assert "vqa_vs_robot_error" not in (tmp_path / "report" / "report.html").read_text()


def test_missing_folders_and_broken_files_are_named(runs, tmp_path):
    with pytest.raises(VlaflowError, match="nowhere: no such folder \\(run 'x'\\)"):
        write_report([Run("x", None, (tmp_path / "nowhere",))], tmp_path / "out")
    (runs[0].evaluations[0] / "vqa_summary.json").write_text("{broken")
    with pytest.raises(VlaflowError, match="vlm/vqa/vqa_summary.json: not valid JSON"):
        write_report(runs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
