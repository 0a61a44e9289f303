"""vlaflow's VQA scoring against the real VLMEvalKit (`ms-vlmeval`, see tests/vlmevalkit.py), item
by item, on a generated adversarial set: every letter and text form of an answer, whitespace and
newline padding, option texts with trailing spaces, 2 to 9 options with gaps, all-number option
columns, hints, several splits, MMBench-style circular sets (with and without `g_index`),
MMMU-style interleaved images and open questions, empty and "None" predictions. Any difference
fails with the item and both verdicts."""

import base64
import csv
import io
import math
import random

import pandas as pd
import pytest
from PIL import Image

from tests import vlmevalkit
from tests.conftest import random_image
from vlaflow.evaluation import exact_matching
from vlaflow.evaluation.vqa import decode_image, read_benchmark, score_benchmark

ROWS_PER_BENCHMARK = 260
MODEL = "parity"
TEXTS = [
    "red", "red ", "dark red", "blue square", "green\ttriangle", "  padded  ", "line\nbreak", "banana",
    "none", "Other", "a", "it", "yes", "no", "ca. 3", "(b) maybe", "Z", "x" * 40,
]  # fmt: skip
NUMBERS = ["1", "2", "2.5", "2.50", "4", "10", "0", "-3", "1e3", "7"]
MMBENCH_CATEGORIES = ["coarse_perception", "logic_reasoning", "finegrained_perception (instance-level)", "other"]


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, (8, 8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def answer_forms(rng: random.Random, letters: list[str], texts: dict[str, str]) -> str:
    """One adversarial prediction for a question with these options."""
    letter = rng.choice(letters)
    other = rng.choice([chr(ord("A") + n) for n in range(26)])
    text = str(texts[letter])
    forms = [
        letter, f"({letter})", f"{letter}.", f"**{letter}**", f"Answer: {letter}", f"The answer is {letter}",
        f"{letter} is the answer here, surely", f"{letter} is my final answer", f"so {letter} is my answer", f"{letter.lower()}", f"{letter} or {other}", f"{other}",
        f"{letter}: {text}", text, text.upper(), f" {text} ", f"{text}\n\n", text + " " * rng.randint(10, 200),
        "\n" * rng.randint(5, 80) + text, f"it is {text}, I think", f"{text} or {rng.choice(list(texts.values()))}",
        "Cannot determine the answer", "Failed to obtain answer via API", f"Failed to obtain answer via API {letter}",
        "I'm sorry, but without the image provided", "Z", "none of them: Z", "", "None", "nan", "NA", " ",
        "4", "4.50", "1e3", "=1+1", f"{letter}\t{letter}", "A quick guess: " + letter, "A", "a" * 300,
    ]  # fmt: skip
    return rng.choice(forms)


def option_cells(rng: random.Random, count: int, numeric: bool) -> list[str]:
    pool = NUMBERS if numeric else TEXTS
    return rng.sample(pool, count) if count <= len(pool) else [rng.choice(pool) for _ in range(count)]


def write_tsv(path, rows: list[dict]) -> None:
    header = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", encoding="utf-8", newline="") as tsv:
        writer = csv.DictWriter(tsv, header, delimiter="\t", lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)


def plain_rows(rng, count, *, splits=(), groups=(), hints=False, numeric=False, max_options=9, start=0):
    rows = []
    image = png_base64(start)
    for number in range(count):
        index = start + number
        option_count = rng.randint(2, max_options)
        letters = [chr(ord("A") + n) for n in range(9)]
        present = sorted(rng.sample(range(9), option_count)) if rng.random() < 0.3 else list(range(option_count))
        cells = option_cells(rng, option_count, numeric)
        row = {
            "index": index,
            "image": image if number == 0 else str(start),
            "question": rng.choice(["Which?", "What is 2+2?"]),
        }
        row |= {letter: "" for letter in letters}
        row |= {letters[position]: cell for position, cell in zip(present, cells)}
        row["answer"] = letters[rng.choice(present)]
        if hints:
            row["hint"] = rng.choice(["", "Look left.", "None", "a hint\twith a tab"])
        for name, values in (("split", splits), *groups):
            if values:
                row[name] = rng.choice(values)
        rows.append(row)
    return rows


def circular_rows(rng, count, *, with_g_index: bool, splits=()):
    """MMBench's layout: each question and its rotations (the options shifted, the answer with them)
    at index + k * 1e6, grouped by g_index."""
    rows = []
    image = png_base64(1)
    for group in range(count):
        option_count = rng.randint(2, 4)
        letters = [chr(ord("A") + n) for n in range(option_count)]
        cells, answer = option_cells(rng, option_count, numeric=False), rng.randrange(option_count)
        category, split = rng.choice(MMBENCH_CATEGORIES), rng.choice(splits) if splits else None
        for shift in range(option_count):
            index = group + shift * 1_000_000
            rotated = cells[shift:] + cells[:shift]
            # VLMEvalKit's vanilla scoring fails on a missing question (`cn_string(nan)`); circular does not
            row = {"index": index, "image": image if index == 0 else "0", "question": rng.choice(["Which?", "None"])}
            row |= dict(zip(letters, rotated)) | {"answer": letters[(answer - shift) % option_count]}
            row |= {"category": category, "l2-category": "l2-" + category[:4]}
            if with_g_index:
                row["g_index"] = group
            if split:
                row["split"] = split
            rows.append(row)
    return rows


def mmmu_rows(rng, count):
    rows, images = [], [png_base64(seed) for seed in (2, 3, 4)]
    for index in range(count):
        kind = rng.choice(["interleaved", "open", "plain"])
        row = {"index": index, "split": rng.choice(["dev", "validation"]), "category": rng.choice(["Art", "Math"])}
        if kind == "open":
            row |= {"image": images[0], "question": "How many degrees?", "answer": rng.choice(["90", "A", "ninety"])}
        else:
            count_images = rng.randint(1, 3)
            row["image"] = str(images[:count_images]) if count_images > 1 else images[0]
            placeholders = " ".join(f"<image {n + 1}>" for n in range(count_images))
            row["question"] = f"Compare {placeholders} here" if kind == "interleaved" else "Which?"
            cells = option_cells(rng, rng.randint(2, 5), numeric=False)
            row |= dict(zip("ABCDE", cells)) | {"answer": rng.choice("ABCDE"[: len(cells)])}
        rows.append(row)
    return rows


def benchmarks(rng: random.Random) -> dict[str, list[dict]]:
    """Nine table layouts."""
    n = ROWS_PER_BENCHMARK
    return {
        "ParityPlain": plain_rows(rng, n),
        "ParityHints": plain_rows(rng, n, hints=True, groups=(("category", ["color", "shape"]),)),
        "ParitySplits": plain_rows(
            rng,
            n,
            splits=("dev", "test", "val"),
            groups=(("category", ["c1", "c2", "c3"]), ("l2-category", ["x", "y"])),
        ),
        "ParityNumeric": plain_rows(rng, n, numeric=True, max_options=5, splits=("test",)),
        "ParityClash": plain_rows(
            rng, n, groups=(("category", ["shared", "coarse_perception"]), ("l2-category", ["shared", "split"]))
        ),
        "MMBench_DEV_EN_parity": circular_rows(rng, n // 3, with_g_index=True),
        "CCBench_parity": circular_rows(rng, n // 3, with_g_index=False, splits=("dev", "test")),
        "MMMU_parity": mmmu_rows(rng, n),
        "ParityMMCR": circular_rows(rng, n // 3, with_g_index=True),
    }


def predictions_for(rng, name: str, benchmark) -> list[str]:
    if name == "ParityNumeric":  # all numbers: pandas reads the prediction column back as numbers
        return [rng.choice(NUMBERS + ["", "None"]) for _ in benchmark.questions]
    predictions = []
    for question in benchmark.questions:
        texts = {letter: str(cell) for letter, cell in question.options.items()} or {"A": "x", "B": "y"}
        predictions.append(answer_forms(rng, list(texts), texts))
    return predictions


def vlmevalkit_dataset(kit, name):
    dataset_class = kit.image_mcq.MMMUDataset if name.startswith("MMMU") else kit.image_mcq.ImageMCQDataset
    return dataset_class(name)


def same(ours, theirs) -> bool:
    if isinstance(ours, float) and isinstance(theirs, float) and math.isnan(ours) and math.isnan(theirs):
        return True
    return ours == theirs


@pytest.fixture(scope="module")
def parity_set(tmp_path_factory):
    """The generated benchmarks in an LMUData folder, their predictions in VLMEvalKit's prediction
    files (written by vlaflow), and VLMEvalKit's modules."""
    lmudata = tmp_path_factory.mktemp("LMUData")
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMUData", str(lmudata))
        patch.delenv("VERBOSE", raising=False)
        kit = vlmevalkit.load()
        rng = random.Random(0)
        cases = {}
        for name, rows in benchmarks(rng).items():
            write_tsv(lmudata / f"{name}.tsv", rows)
            benchmark = read_benchmark(lmudata / f"{name}.tsv")
            predictions = predictions_for(rng, name, benchmark)
            prediction_file = work / f"{MODEL}_{name}.xlsx"
            ours = score_benchmark(benchmark, predictions, prediction_file)
            theirs = vlmevalkit_dataset(kit, name).evaluate(str(prediction_file), model="exact_matching", nproc=1)
            (record,) = work.glob(f"{MODEL}_{name}_exact_matching_result.xlsx")
            cases[name] = (benchmark, predictions, ours, theirs, pd.read_excel(record))
        yield kit, lmudata, work, cases


def test_the_set_is_large_enough(parity_set):
    _, _, _, cases = parity_set
    assert sum(len(predictions) for _, predictions, _, _, _ in cases.values()) >= 2000
    assert sum(len(ours.answers) for _, _, ours, _, _ in cases.values()) >= 2000  # every one read
    assert len(cases) >= 8
    assert {name for name in cases if exact_matching.is_circular(name)} == {
        "MMBench_DEV_EN_parity",
        "CCBench_parity",
        "ParityMMCR",
    }


def test_every_item_is_read_as_vlmevalkit_reads_it(parity_set):
    kit, _, _, cases = parity_set
    differences = []
    for name, (_, _, ours, _, _) in cases.items():
        for _, row in ours.answers.iterrows():
            choices = exact_matching.row_choices(row)
            theirs = kit.matching.can_infer(row["prediction"], dict(choices)) or ""
            if (row["extracted"]) != theirs:
                differences.append(
                    f"{name} index {row['index']}: {row['prediction']!r} {choices}: vlaflow {row['extracted']!r}, VLMEvalKit {theirs!r}"
                )
    assert not differences, f"{len(differences)} differences, e.g.\n" + "\n".join(differences[:20])


def test_every_verdict_is_vlmevalkits(parity_set):
    _, _, _, cases = parity_set
    differences = []
    for name, (_, _, ours, _, record) in cases.items():
        theirs = dict(zip(record["index"], record["hit"]))
        assert set(theirs) == set(ours.rows["index"]), f"{name}: VLMEvalKit scored other rows than vlaflow"
        for index, prediction, hit in zip(ours.rows["index"], ours.rows["prediction"], ours.rows["hit"]):
            if hit != theirs[index]:
                differences.append(
                    f"{name} index {index}: {prediction!r}: vlaflow hit {hit}, VLMEvalKit hit {theirs[index]}"
                )
    assert not differences, f"{len(differences)} differences, e.g.\n" + "\n".join(differences[:20])


def test_every_table_is_vlmevalkits(parity_set):
    _, _, _, cases = parity_set
    for name, (_, _, ours, theirs, _) in cases.items():
        their_rows = {str(row["split"]): row for row in theirs.to_dict("records")}
        our_rows = {str(row["split"]): row for row in ours.table}
        assert (
            our_rows.keys() == their_rows.keys()
        ), f"{name}: splits {sorted(our_rows)} vs VLMEvalKit {sorted(their_rows)}"
        for split, row in our_rows.items():
            assert list(row) == list(their_rows[split]), f"{name} split {split}: columns differ"
            differing = {
                column: (row[column], their_rows[split][column])
                for column in row
                if not same(row[column], their_rows[split][column])
            }
            assert not differing, f"{name} split {split}: (vlaflow, VLMEvalKit) {differing}"


def test_every_prompt_is_vlmevalkits(parity_set):
    kit, _, _, cases = parity_set
    compared = 0
    for name, (benchmark, _, _, _, _) in cases.items():
        dataset = vlmevalkit_dataset(kit, name)
        for position, question in enumerate(benchmark.questions[:40]):
            theirs = dataset.build_prompt(dataset.data.iloc[position])
            ours = benchmark.prompt(question)
            assert [part["type"] for part in ours] == [
                part["type"] for part in theirs
            ], f"{name} index {question.index}"
            for our_part, their_part in zip(ours, theirs):
                if our_part["type"] == "text":
                    assert our_part["value"] == their_part["value"], f"{name} index {question.index}"
                else:
                    with Image.open(their_part["value"]) as image:
                        assert decode_image(our_part["value"]).tobytes() == image.convert("RGB").tobytes()
            compared += 1
    assert compared >= 30


def test_the_prediction_file_is_the_one_vlmevalkit_writes(parity_set, tmp_path):
    kit, _, work, cases = parity_set
    for name, (_, predictions, _, _, _) in cases.items():
        data = vlmevalkit_dataset(kit, name).data.copy()
        data["prediction"] = [str(prediction) for prediction in predictions]
        data.pop("image")
        kit.smp.dump(data, str(tmp_path / f"{name}.xlsx"))
        pd.testing.assert_frame_equal(
            pd.read_excel(work / f"{MODEL}_{name}.xlsx"), pd.read_excel(tmp_path / f"{name}.xlsx"), obj=name
        )
