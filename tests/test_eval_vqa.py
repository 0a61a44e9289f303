import base64
import csv
import inspect
import io
import json
from pathlib import Path

import pytest

from tests.conftest import random_image
from vlaflow.data.easy_vqa import EASY_VQA_BENCHMARK, build_easy_vqa_benchmark
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.vlmevalkit import VlaflowVLM
from vlaflow.evaluation.benchmark_kind import read_prediction_file
from vlaflow.evaluation.exact_matching import can_infer
from vlaflow.evaluation.metrics import METRICS_FILE, read_metrics
from vlaflow.evaluation.vqa import (
    SUMMARY,
    answer_messages,
    benchmark_summary,
    decode_image,
    evaluate_vqa,
    read_benchmark,
    score_benchmark,
)

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"A": "blue square", "B": "green triangle", "C": "red circle", "D": "yellow star"}


def png_base64(seed: int, size=(16, 16)) -> str:
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_tsv(path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as tsv:
        writer = csv.writer(tsv, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def read_tsv(path, delimiter="\t") -> list[dict]:
    with open(path, encoding="utf-8", newline="") as table:
        return list(csv.DictReader(table, delimiter=delimiter))


# --- reading an option from a prediction: VLMEvalKit's exact matching ---


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("The answer is B.", "B"),
        ("(B)", "B"),
        ("B: green triangle", "B"),
        ("**C**", "C"),
        ("  D\n", "D"),
        ("a red circle", "C"),  # no letter: the one option whose text it restates
        ("Red Circle", "C"),  # restated text is matched lower-cased
        ("A or B", None),  # two letters, and no option's text
        ("I cannot answer this.", None),
        ("Cannot determine the answer: B", "Z"),  # one of VLMEvalKit's refusals
        ("Failed to obtain answer via API: B", None),  # read for option texts only
        ("", None),
        ("Z", "Z"),  # VLMEvalKit's "none of the options"
        ("B is the answer here", None),  # B is not among the last four words
        ("B is the answer", "B"),
        ("A red circle", "A"),  # VLMEvalKit reads the article "A" as the letter
        ("purple", None),
        ("red circle or blue square", None),  # two options restated
    ],
)
def test_can_infer_gives_vlmevalkits_verdict(prediction, expected):
    assert can_infer(prediction, OPTIONS) == expected


def test_a_letter_that_is_no_option_is_not_read():
    assert can_infer("E", OPTIONS) is None
    assert can_infer("E", {**OPTIONS, "E": "black dot"}) == "E"


def test_a_prediction_far_longer_than_the_options_is_not_searched_for_their_text():
    rambling = "it could be a red circle " + "or perhaps something else entirely " * 5
    assert can_infer(rambling, OPTIONS) is None
    assert can_infer("it could be a red circle", OPTIONS) == "C"


# --- reading benchmarks ---


@pytest.fixture
def variants_tsv(tmp_path):
    """Five option columns (E and some D cells empty), hints, shared images, two splits, categories."""
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "E", "answer"]
    header += ["category", "l2-category", "split"]
    rows = [
        [10, png_base64(0), "What shape?", "Look closely.", "circle", "square", "star", "", "", "C"],
        [11, "10", "What colour?", "", "red", "blue", "green", "gray", "teal", "E"],
        [12, png_base64(1), "Is it big?", "nan", "yes", "no", "", "", "", "A"],
        [13, "12", "How many?", "", "1", "2", "3", "4", "5", "D"],
    ]
    groups = [
        ["shape", "identify", "dev"],
        ["color", "identify", "dev"],
        ["size", "judge", "validation"],
        ["count", "judge", "validation"],
    ]
    path = tmp_path / "Variants.tsv"
    write_tsv(path, header, [row + group for row, group in zip(rows, groups)])
    return path


def test_tsv_variants_load_with_shared_images_hints_and_absent_options(variants_tsv):
    questions = read_benchmark(variants_tsv).questions
    assert [question.index for question in questions] == [10, 11, 12, 13]
    first, second, third, fourth = questions
    assert second.images == first.images and fourth.images == third.images != first.images
    assert first.options == {"A": "circle", "B": "square", "C": "star"}
    assert second.options == {"A": "red", "B": "blue", "C": "green", "D": "gray", "E": "teal"}
    assert first.hint == "Look closely." and second.hint is None
    assert third.hint is None  # pandas, and so VLMEvalKit, reads "nan" as a missing cell
    assert fourth.options["D"] == "4"  # the column has text too, so pandas keeps text
    assert decode_image(first.images[0]).size == (16, 16)
    assert [question.index for question in read_benchmark(variants_tsv, limit=2).questions] == [10, 11]


def prompt_text(benchmark, question) -> str:
    return benchmark.prompt(question)[-1]["value"]


def test_prompt_is_vlmevalkits_multiple_choice_prompt(variants_tsv):
    benchmark = read_benchmark(variants_tsv)
    with_hint, five_options = benchmark.questions[:2]
    assert prompt_text(benchmark, with_hint) == (
        "Hint: Look closely.\n"
        "Question: What shape?\n"
        "Options:\n"
        "A. circle\n"
        "B. square\n"
        "C. star\n"
        "Please select the correct answer from the options above. \n"
    )
    assert prompt_text(benchmark, five_options).startswith("Question: What colour?\nOptions:\nA. red\n")
    assert "E. teal\nPlease select" in prompt_text(benchmark, five_options)


def test_mmmu_rows_with_several_images_and_open_questions_load_as_vlmevalkit_reads_them(tmp_path):
    images = [png_base64(0), png_base64(1)]
    header = ["index", "image", "image_path", "question", "A", "B", "C", "answer", "split", "category"]
    rows = [
        [1, str(images), "['1-1.jpg', '1-2.jpg']", "<image 1> or <image 2>?", "left", "right", "", "B"],
        [2, images[0], "2.jpg", "How many degrees?", "", "", "", "90", "validation", "Math"],
    ]
    write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, [rows[0] + ["dev", "Art"], rows[1]])
    benchmark = read_benchmark(tmp_path / "MMMU_DEV_VAL.tsv")
    several, open_question = benchmark.questions
    assert several.images == tuple(images)
    assert prompt_text(benchmark, open_question) == "Question: How many degrees?\n"
    assert open_question.answer == "A" and open_question.options == {}
    message = benchmark.prompt(several)
    assert [part["type"] for part in message] == ["text", "image", "text", "image", "text"]
    assert [part["value"] for part in message if part["type"] == "image"] == images
    assert message[0]["value"] == "Question: " and message[2]["value"] == " or "


def test_image_cells_beyond_csvs_default_field_limit_load(tmp_path):
    large = png_base64(0, (256, 256))
    csv.field_size_limit(131072)  # csv's default, whatever ran before
    assert len(large) > 131072
    write_tsv(
        tmp_path / "Large.tsv", ["index", "image", "question", "A", "B", "answer"], [[0, large, "q", "x", "y", "B"]]
    )
    assert read_benchmark(tmp_path / "Large.tsv").questions[0].images == (large,)


# --- scoring ---


def test_scores_and_vlmevalkits_table_per_split(variants_tsv, tmp_path):
    benchmark = read_benchmark(variants_tsv)
    predictions = ["C", "The answer is E.", "no", "I do not know."]
    scored = score_benchmark(benchmark, predictions, tmp_path / "model_Variants.xlsx")
    assert list(zip(scored.rows["extracted"], scored.rows["hit"])) == [("C", 1), ("E", 1), ("B", 0), ("", 0)]
    assert list(read_prediction_file(tmp_path / "model_Variants.xlsx")["prediction"]) == predictions
    nan = pytest.approx(float("nan"), nan_ok=True)
    assert scored.table == [
        {
            "split": "dev",
            "Overall": 1.0,
            "identify": 1.0,
            "judge": nan,
            "color": 1.0,
            "count": nan,
            "shape": 1.0,
            "size": nan,
        },
        {
            "split": "validation",
            "Overall": 0.0,
            "identify": nan,
            "judge": 0.0,
            "color": nan,
            "count": 0.0,
            "shape": nan,
            "size": 0.0,
        },
    ]
    summary = benchmark_summary(benchmark, scored)
    assert summary["overall"] == 0.5 and summary["total"] == 4
    assert summary["chance"] == pytest.approx((1 / 3 + 1 / 5 + 1 / 2 + 1 / 5) / 4)  # 3, 5, 2 and 5 options
    assert summary["split"] == {"dev": 1.0, "validation": 0.0}
    assert summary["vlmevalkit"][0]["judge"] is None  # JSON has no NaN


# --- errors name the file, the row and the field ---


def test_a_missing_benchmark_is_an_error_naming_its_path(tmp_path):
    with pytest.raises(VlaflowError, match=r"MMStar\.tsv: missing"):
        read_benchmark(tmp_path / "MMStar.tsv")


@pytest.mark.parametrize(
    "row, message",
    [
        ([7, png_base64(0), "Which?", "x", "y", "", "C"], r"Bad\.tsv: row index 7: answer: 'C' is not the letter"),
        ([7, png_base64(0), "Which?", "x", "y", "", "AB"], r"row index 7: answer: 'AB'"),
        ([7, "not-base64!" * 10, "Which?", "x", "y", "", "A"], r"Bad\.tsv: row index 7: image: the image is not"),
        ([7, base64.b64encode(b"text").decode() * 20, "Which?", "x", "y", "", "A"], r"row index 7: image: the image"),
        ([7, str([png_base64(0), "broken" * 20]), "Which?", "x", "y", "", "A"], r"7: image: image 2 of 2 is not"),
        ([7, "3", "Which?", "x", "y", "", "A"], r"row index 7: image: refers to index 3, which holds no image"),
        ([7, "", "Which?", "x", "y", "", "A"], r"row index 7: image: empty"),
        (["seven", png_base64(0), "Which?", "x", "y", "", "A"], r"Bad\.tsv: line 2: index: 'seven' is not an integer"),
    ],
)
def test_a_malformed_row_is_a_one_line_error_naming_file_row_and_field(tmp_path, row, message):
    write_tsv(tmp_path / "Bad.tsv", ["index", "image", "question", "A", "B", "C", "answer"], [row])
    with pytest.raises(VlaflowError, match=message) as error:
        read_benchmark(tmp_path / "Bad.tsv")
    assert "\n" not in str(error.value)


def test_a_row_without_a_category_is_an_error_naming_it(tmp_path):
    header = ["index", "image", "question", "A", "B", "answer", "category"]
    write_tsv(
        tmp_path / "Bad.tsv", header, [[1, png_base64(0), "q", "x", "y", "A", "size"], [2, "1", "q", "x", "y", "A", ""]]
    )
    with pytest.raises(VlaflowError, match=r"Bad\.tsv: row index 2: category: empty"):
        read_benchmark(tmp_path / "Bad.tsv")


def test_bad_input_is_reported_before_any_model_loads(tmp_path):
    write_tsv(tmp_path / "Bad.tsv", ["index", "image", "question", "A", "B", "answer"], [[1, "", "q", "x", "y", "A"]])
    with pytest.raises(VlaflowError, match="Bad.tsv: row index 1: image: empty"):
        evaluate_vqa(tmp_path / "no-such-model", ["Bad"], tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- end to end, with the tiny (untrained) model ---


@pytest.fixture(scope="module")
def evaluated(vla_folder, tmp_path_factory):
    lmudata = tmp_path_factory.mktemp("LMUData")
    build_easy_vqa_benchmark(lmudata / f"{EASY_VQA_BENCHMARK}.tsv", limit=12)
    out = tmp_path_factory.mktemp("eval") / "vqa"
    summary = evaluate_vqa(vla_folder, [EASY_VQA_BENCHMARK], lmudata, out, batch_size=4, max_new_tokens=4)
    return lmudata, out, summary


def test_evaluation_writes_vlmevalkits_files_verdicts_and_summary(evaluated, vla_folder):
    lmudata, out, summary = evaluated
    stem = f"{vla_folder.name}_{EASY_VQA_BENCHMARK}"
    expected = [f"{stem}.xlsx", f"{stem}_verdicts.tsv", f"{stem}_acc.csv", SUMMARY, METRICS_FILE]
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)

    source = read_tsv(lmudata / f"{EASY_VQA_BENCHMARK}.tsv")
    predictions = read_prediction_file(out / f"{stem}.xlsx")
    assert list(predictions.columns) == [column for column in source[0] if column != "image"] + ["prediction"]
    verdicts = read_tsv(out / f"{stem}_verdicts.tsv")
    assert list(verdicts[0]) == ["index", "GT", "prediction", "extracted", "hit", "split", "category", "l2-category"]
    assert [row["index"] for row in verdicts] == [row["index"] for row in source]
    for row, question in zip(verdicts, source):
        options = {letter: question[letter] for letter in "ABCD" if question[letter]}
        assert row["extracted"] == (can_infer(row["prediction"], options) or "")
        assert row["hit"] == str(int((row["extracted"] or "Z") == question["answer"]))

    (table,) = read_tsv(out / f"{stem}_acc.csv", delimiter=",")
    hits = [int(row["hit"]) for row in verdicts]
    assert table["split"] == "test" and float(table["Overall"]) == pytest.approx(sum(hits) / len(hits))
    assert {row["category"] for row in source} | {row["l2-category"] for row in source} < set(table)

    assert json.loads((out / SUMMARY).read_text()) == summary
    easy = summary[EASY_VQA_BENCHMARK]
    assert easy["total"] == 12 and easy["split"] == {"test": easy["overall"]}
    assert easy["vlmevalkit"][0]["Overall"] == pytest.approx(easy["overall"])
    metrics = read_metrics(out / METRICS_FILE)[EASY_VQA_BENCHMARK]
    assert (metrics["accuracy"], metrics["chance"], metrics["Overall (test)"]) == (
        easy["overall"],
        easy["chance"],
        easy["vlmevalkit"][0]["Overall"],
    )
    assert {f"{name} (test)" for name in easy["category"]} < set(metrics)
    assert set(easy["category"]) == {row["category"] for row in source}
    assert all(0 <= value <= 1 for group in ("category", "l2-category") for value in easy[group].values())


def test_an_existing_output_folder_is_refused(evaluated, vla_folder):
    lmudata, out, _ = evaluated
    with pytest.raises(VlaflowError, match="already exists"):
        evaluate_vqa(vla_folder, [EASY_VQA_BENCHMARK], lmudata, out)


def test_vlmevalkit_adapter_answers_through_the_same_code(vla_folder, tmp_path, variants_tsv):
    benchmark = read_benchmark(variants_tsv, limit=1)
    (question,) = benchmark.questions
    image = decode_image(question.images[0])
    image.save(tmp_path / "image.png")
    model = VlaflowVLM(model_path=str(vla_folder), max_new_tokens=4)
    text = prompt_text(benchmark, question)
    message = [{"type": "image", "value": str(tmp_path / "image.png")}, {"type": "text", "value": text}]
    expected = answer_messages(model.model, model.processor, [[image, text]], max_new_tokens=4)
    assert model.generate_inner(message, dataset="Variants") == expected[0]


def test_vlmevalkit_adapter_defaults_to_the_workflows_stage2_model():
    assert inspect.signature(VlaflowVLM).parameters["model_path"].default == "results/models/stage2"
    assert (ROOT / "workflow" / "rules" / "train.smk").read_text().count('result("models/stage2")') == 1
