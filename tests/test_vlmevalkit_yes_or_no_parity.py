"""vlaflow's yes-or-no scoring (`vlaflow.evaluation.yes_or_no`) against the real VLMEvalKit's
`ImageYORNDataset`, item by item, on a generated adversarial set: answers in every case and
punctuation, both words, neither, lookalikes ("Yesterday", "nope"), digit-comma-digit numbers (which
change how punctuation is dropped), runs of periods past VLMEvalKit's 32-period limit, empty and
"None" predictions; and every table VLMEvalKit chooses by name (MME, POPE, AMBER, VSR-zeroshot,
the default) with their category layouts."""

import random

import pandas as pd
import pytest
from PIL import Image

from tests import vlmevalkit
from tests.test_vlmevalkit_parity import png_base64, same, write_tsv
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.benchmark_kind import read_prediction_file
from vlaflow.evaluation.vqa import decode_image, read_benchmark, score_benchmark
from vlaflow.evaluation.yes_or_no import AMBER_CATEGORIES, MME_SUPER_CATEGORIES

MODEL = "parity"
ROWS_PER_BENCHMARK = 240
FORMS = [
    "Yes", "No", "yes", "no", "YES", "nO", "No.", "Yes, it is.", "no, it isn't", "Yes and no", "yes/no", "yes-no",
    "yes_no", "yes.no", "no.yes", "Yesterday", "nope", "not", "Unknown", "y", "n", "", "None", "nan", " ", "1", "0",
    "1,000 yes", "yes 1,000", "1,5: no", "(yes)", "(yes", "yes)", "[no]", '"yes"', "'yes'", "yes'", "yes.", "yes...",
    "." * 20 + "yes", "." * 40 + "yes", "yes" + "." * 33, "no!", "No?", "well, yes", "yes ,no", "yes , no",
    "the answer is: yes", "the answer is:yes", "yes\nno", "\n\nyes\n", "Yes" + " " * 100, "3.5 yes", "yes;",
    "yes ;", "@yes", "yes@no", "YES!!!", "no-one says yes", "Is it? No", "yes?no", "<yes>", "yes=no", "yes+",
    "\\yes", "`no`", "{yes}", "No. Yes.", "I cannot tell", "Failed to obtain answer via API", "1,5 yes/maybe",
    "yes/maybe", "(no)1,2", "yes-maybe -ok", "yes-maybe - ok", "yes-maybe- ok", "no/maybe /", "no/maybe/",
]  # fmt: skip


def yes_or_no_rows(rng, count, *, categories=(), l2_categories=(), per_image=1, answers=("Yes", "No"), nan_share=0.0):
    """Rows of `per_image` (or one more) questions on each image, each image with its `image_path`."""
    rows, index, image_number = [], 0, 0
    while index < count:
        image, path = png_base64(image_number), f"img_{image_number}.png"
        category = rng.choice(categories) if categories else None
        for _ in range(per_image + (rng.random() < 0.2)):
            row = {"index": index, "image": image, "image_path": path, "question": f"Is it {rng.choice('ab')}?"}
            row["answer"] = rng.choice(answers)
            if categories:
                row["category"] = "" if rng.random() < nan_share else category
            if l2_categories:
                row["l2-category"] = rng.choice(l2_categories)
            rows.append(row)
            index += 1
        image_number += 1
    return rows


def benchmarks(rng):
    """(rows, the kind vlaflow is told, or None when the name implies it)."""
    n = ROWS_PER_BENCHMARK
    pope = ["adversarial", "popular", "random", "popular,random", "adversarial,popular,random"]
    amber = [*AMBER_CATEGORIES, "Other"]
    return {
        "MME_parity": (
            yes_or_no_rows(
                rng, n, categories=[*MME_SUPER_CATEGORIES["perception"][:4], "code_reasoning", "misc"], per_image=2
            ),
            "yes_or_no",
        ),
        "POPE_parity": (yes_or_no_rows(rng, n, categories=pope, nan_share=0.1), "yes_or_no"),
        "AMBER": (yes_or_no_rows(rng, n, categories=amber, answers=("yes", "no", "Yes", "NO")), None),
        "VSR-zeroshot_parity": (yes_or_no_rows(rng, n), "yes_or_no"),
        "ParityYesNo": (
            yes_or_no_rows(rng, n, categories=["color", "shape", "Overall"], l2_categories=["shape", "perception"]),
            "yes_or_no",
        ),
    }


@pytest.fixture(scope="module")
def parity_set(tmp_path_factory):
    lmudata = tmp_path_factory.mktemp("LMUData")
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMUData", str(lmudata))
        kit = vlmevalkit.load()
        # the generated AMBER.tsv stands in for the published one, whose checksum VLMEvalKit checks
        patch.delitem(kit.image_yorn.ImageYORNDataset.DATASET_MD5, "AMBER")
        rng = random.Random(0)
        cases = {}
        for name, (rows, kind) in benchmarks(rng).items():
            write_tsv(lmudata / f"{name}.tsv", rows)
            benchmark = read_benchmark(lmudata / f"{name}.tsv", kind=kind)
            predictions = [rng.choice(FORMS) for _ in benchmark.questions]
            prediction_file = work / f"{MODEL}_{name}.xlsx"
            ours = score_benchmark(benchmark, predictions, prediction_file)
            dataset = kit.image_yorn.ImageYORNDataset(name)
            theirs = dataset.evaluate(str(prediction_file), model="exact_matching", nproc=1)
            record = pd.read_excel(work / f"{MODEL}_{name}_auxmatch.xlsx")
            cases[name] = (benchmark, ours, theirs, record, dataset)
        yield kit, cases


def test_the_set_covers_every_table(parity_set):
    _, cases = parity_set
    assert sum(len(ours.rows) for _, ours, _, _, _ in cases.values()) >= 1000
    assert {benchmark.kind.name for benchmark, *_ in cases.values()} == {"yes_or_no"}


def test_every_answer_is_read_as_vlmevalkit_reads_it(parity_set):
    kit, cases = parity_set
    differences = [
        f"{name} index {index}: {prediction!r}: vlaflow {extracted!r}, VLMEvalKit {kit.yorn.YOrN_Extraction(prediction)!r}"
        for name, (_, ours, _, _, _) in cases.items()
        for index, prediction, extracted in zip(ours.rows["index"], ours.rows["prediction"], ours.rows["extracted"])
        if extracted != kit.yorn.YOrN_Extraction(prediction)
    ]
    assert not differences, f"{len(differences)} differences, e.g.\n" + "\n".join(differences[:20])


def test_every_verdict_is_vlmevalkits(parity_set):
    _, cases = parity_set
    differences = []
    for name, (_, ours, _, record, _) in cases.items():
        theirs = dict(zip(record["index"], record["score"]))
        assert set(theirs) == set(ours.rows["index"]), f"{name}: VLMEvalKit scored other rows than vlaflow"
        for index, prediction, hit in zip(ours.rows["index"], ours.rows["prediction"], ours.rows["hit"]):
            if hit != int(theirs[index]):
                differences.append(f"{name} index {index}: {prediction!r}: vlaflow {hit}, VLMEvalKit {theirs[index]}")
    assert not differences, f"{len(differences)} differences, e.g.\n" + "\n".join(differences[:20])


def test_every_table_is_vlmevalkits(parity_set):
    _, cases = parity_set
    for name, (_, ours, theirs, _, _) in cases.items():
        their_rows = theirs.to_dict("records")
        if "split" in theirs:  # POPE's category rows come in VLMEvalKit's set order
            their_rows = sorted(their_rows, key=lambda row: (row["split"] != "Overall", row["split"]))
        assert len(ours.table) == len(their_rows), name
        for our_row, their_row in zip(ours.table, their_rows):
            assert list(our_row) == list(their_row), f"{name}: columns {list(our_row)} vs VLMEvalKit {list(their_row)}"
            differing = {
                column: (our_row[column], their_row[column])
                for column in our_row
                if not same(our_row[column], float(their_row[column]) if column != "split" else their_row[column])
            }
            assert not differing, f"{name}: (vlaflow, VLMEvalKit) {differing}"


def test_every_prompt_is_vlmevalkits(parity_set):
    _, cases = parity_set
    compared = 0
    for name, (benchmark, _, _, _, dataset) in cases.items():
        for position, question in enumerate(benchmark.questions[:20]):
            theirs = dataset.build_prompt(dataset.data.iloc[position])
            ours = benchmark.prompt(question)
            assert [part["type"] for part in ours] == [part["type"] for part in theirs], f"{name} {question.index}"
            assert ours[-1]["value"] == theirs[-1]["value"], f"{name} index {question.index}"
            with Image.open(theirs[0]["value"]) as image:
                assert decode_image(ours[0]["value"]).tobytes() == image.convert("RGB").tobytes()
            compared += 1
    assert compared >= 100
    assert cases["AMBER"][0].prompt(cases["AMBER"][0].questions[0])[-1]["value"].endswith("Please answer yes or no.")


def test_the_tables_are_not_trivial(parity_set):
    _, cases = parity_set
    for name, (_, ours, _, _, _) in cases.items():
        hits = ours.rows["hit"]
        assert 0 < hits.mean() < 1, name
        assert set(ours.rows["extracted"]) == {"Yes", "No", "Unknown"}, name
    assert [row["split"] for row in cases["POPE_parity"][1].table][:1] == ["Overall"]
    assert len(cases["POPE_parity"][1].table) == 4  # Overall and the three categories split at commas
    assert list(cases["MME_parity"][1].table[0])[:2] == ["perception", "reasoning"]
