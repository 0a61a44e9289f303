"""Benchmark kinds beyond multiple choice: a yes-or-no benchmark is read, prompted, answered by the
tiny model and scored by its kind (`vlaflow.evaluation.yes_or_no`), and its bad input is a one-line
error naming the file, the row and the field before any model loads."""

import json

import pytest

from tests.test_eval_vqa import png_base64, write_tsv
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.benchmarks import BENCHMARK_KINDS, benchmark_kind
from vlaflow.evaluation.metrics import METRICS_FILE, read_metrics
from vlaflow.evaluation.vqa import SUMMARY, evaluate_vqa, read_benchmark

HEADER = ["index", "image", "image_path", "question", "answer", "category"]


def probe_rows(answers=("Yes", "No", "No", "Yes"), categories=("color", "color", "shape", "shape")):
    return [
        [index, png_base64(index // 2), f"{index // 2}.png", f"Is it round? ({index})", answer, category]
        for index, (answer, category) in enumerate(zip(answers, categories))
    ]


def test_vlmevalkits_yes_or_no_benchmarks_are_that_kind_by_name_and_others_by_declaration():
    assert [benchmark_kind(name).name for name in ("MME", "POPE", "AMBER", "HallusionBench", "VSR-zeroshot")] == [
        "yes_or_no"
    ] * 5
    assert benchmark_kind("MMStar").name == benchmark_kind("MME_mine").name == "multiple_choice"
    assert benchmark_kind("MMStar", "yes_or_no") is BENCHMARK_KINDS["yes_or_no"]
    with pytest.raises(VlaflowError, match=r"Probe: kind 'yes_no' is not one of multiple_choice, yes_or_no"):
        benchmark_kind("Probe", "yes_no")


def test_a_declared_yes_or_no_benchmark_is_answered_and_scored_as_one(vla_folder, tmp_path):
    write_tsv(tmp_path / "Probe.tsv", HEADER, probe_rows())
    with pytest.raises(VlaflowError, match=r"Probe\.tsv: row index 0: answer: 'Yes' is not the letter"):
        evaluate_vqa(vla_folder, ["Probe"], tmp_path, tmp_path / "as_choice")  # undeclared: multiple choice
    out = tmp_path / "vqa"
    summary = evaluate_vqa(vla_folder, ["Probe"], tmp_path, out, max_new_tokens=3, kinds={"Probe": "yes_or_no"})
    probe = summary["Probe"]
    assert probe["kind"] == "yes_or_no" and probe["total"] == 4 and probe["chance"] == 0.5
    (row,) = probe["vlmevalkit"]
    assert list(row) == ["Overall", "color", "shape"]  # VLMEvalKit's default yes-or-no table
    assert row["Overall"] == pytest.approx(100 * probe["overall"])
    assert row["Overall"] == pytest.approx((row["color"] + row["shape"]) / 2)
    verdicts = (out / f"{vla_folder.name}_Probe_verdicts.tsv").read_text().splitlines()
    assert verdicts[0].split("\t")[:5] == ["index", "GT", "prediction", "extracted", "hit"]
    assert {line.split("\t")[3] for line in verdicts[1:]} <= {"Yes", "No", "Unknown"}
    assert json.loads((out / SUMMARY).read_text()) == summary
    metrics = read_metrics(out / METRICS_FILE)["Probe"]
    assert metrics["accuracy"] == probe["overall"] and metrics["color"] == row["color"]


@pytest.mark.parametrize(
    "name, header, rows, message",
    [
        ("Probe", HEADER, probe_rows(answers=("Yes", "yes", "No", "No")), r"Probe\.tsv: row index 1: answer: 'yes' is not Yes or No"),
        ("Probe", HEADER, probe_rows(answers=("Yes", "", "No", "No")), r"Probe\.tsv: row index 1: answer: nan is not Yes or No"),
        ("MME", HEADER, probe_rows()[:3], r"MME\.tsv: image_path: '1\.png' \(category 'shape'\) has one question"),
        ("MME", HEADER[:-1], [row[:-1] for row in probe_rows()], r"MME\.tsv: no column 'category' in the header"),
        ("AMBER", HEADER, probe_rows(categories=("a", "", "b", "b")), r"AMBER\.tsv: row index 1: category: empty"),
        ("POPE", HEADER, probe_rows(categories=(1, 2, 3, 4)), r"POPE\.tsv: category: no text in the column"),
        ("HallusionBench", HEADER, probe_rows(), r"HallusionBench\.tsv: HallusionBench is scored by VLMEvalKit's Hall"),
    ],
)  # fmt: skip
def test_bad_yes_or_no_input_is_a_one_line_error_before_any_model_loads(tmp_path, name, header, rows, message):
    write_tsv(tmp_path / f"{name}.tsv", header, rows)
    kinds = {name: "yes_or_no"} if name == "Probe" else None
    with pytest.raises(VlaflowError, match=message) as error:
        evaluate_vqa(tmp_path / "no-such-model", [name], tmp_path, tmp_path / "out", kinds=kinds)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_amber_answers_in_any_case_and_its_prompt_asks_for_yes_or_no(tmp_path):
    write_tsv(tmp_path / "AMBER.tsv", HEADER, probe_rows(answers=("yes", "No", "NO", "Yes")))
    benchmark = read_benchmark(tmp_path / "AMBER.tsv")
    assert benchmark.prompt(benchmark.questions[0])[-1]["value"] == "Is it round? (0)\nPlease answer yes or no."
