import base64
import csv
import io
import json
from pathlib import Path

import easy_vqa
import pytest
from PIL import Image

from vlaflow.data import easy_vqa as builders
from vlaflow.data.conversations import VLConversationDataset
from vlaflow.data.easy_vqa import (
    ANSWER_GROUPS,
    EASY_VQA_BENCHMARK,
    IMAGES_FOLDER,
    TRAIN_JSON,
    answer_category,
    build_easy_vqa_benchmark,
    build_easy_vqa_train,
    question_family,
)
from vlaflow.errors import VlaflowError

L2_CATEGORIES = {
    "shape-identification": "shape",
    "color-identification": "color",
    "shape-presence": "yes/no",
    "color-presence": "yes/no",
    "shape-absence": "yes/no",
    "color-absence": "yes/no",
}


def answers_by_image(split_questions) -> dict[int, dict[str, str]]:
    questions, answers, image_ids = split_questions
    by_image = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        by_image.setdefault(image_id, {})[question] = answer
    return by_image


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8", newline="") as tsv:
        reader = csv.DictReader(tsv, delimiter="\t")
        return reader.fieldnames, list(reader)


# --- answers and question families ---


def test_answer_groups_cover_easy_vqa_answers_exactly():
    grouped = [answer for group in ANSWER_GROUPS.values() for answer in group]
    assert sorted(grouped) == sorted(easy_vqa.get_answers())


def test_every_question_family_agrees_with_its_answer():
    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        for question, answer in zip(questions, answers):
            assert L2_CATEGORIES[question_family(question)] == answer_category(answer), question


def test_question_families_on_examples():
    assert question_family("what is the blue shape?") == "shape-identification"
    assert question_family("what is the color of the circle?") == "color-identification"
    assert question_family("is there a circle in the image?") == "shape-presence"
    assert question_family("is a teal shape present?") == "color-presence"
    assert question_family("is no triangle present?") == "shape-absence"
    assert question_family("does the image not contain a gray shape?") == "color-absence"


def test_unknown_answer_is_reported():
    with pytest.raises(VlaflowError, match="purple"):
        answer_category("purple")


# --- training conversations ---


@pytest.fixture(scope="module")
def train_answers():
    return answers_by_image(easy_vqa.get_train_questions())


def test_train_folder_is_llava_conversations_with_their_images(tmp_path, train_answers):
    out = build_easy_vqa_train(tmp_path / "train", limit=20, seed=0, max_turns=3)

    assert sorted(p.name for p in out.iterdir()) == [TRAIN_JSON, IMAGES_FOLDER]
    entries = json.loads((out / TRAIN_JSON).read_text(encoding="utf-8"))
    assert isinstance(entries, list) and len(entries) == 20
    assert len({entry["id"] for entry in entries}) == 20
    assert sorted(p.name for p in (out / IMAGES_FOLDER).iterdir()) == sorted(entry["image"] for entry in entries)
    for entry in entries:
        assert set(entry) == {"id", "image", "conversations"}
        image_id = int(Path(entry["image"]).stem)
        assert decode_png((out / IMAGES_FOLDER / entry["image"]).read_bytes()).size == (64, 64)

        turns = entry["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert len(turns) // 2 == min(3, len(train_answers[image_id]))
        assert sum(turn["value"].count("<image>") for turn in turns) == 1
        assert turns[0]["value"].startswith("<image>\n")
        questions = [turns[0]["value"].removeprefix("<image>\n")] + [turn["value"] for turn in turns[2::2]]
        assert len(set(questions)) == len(questions)
        for question, reply in zip(questions, turns[1::2]):
            assert reply["value"] == train_answers[image_id][question]


def test_train_conversations_shuffle_questions_and_keep_all_within_max_turns(tmp_path, train_answers):
    out = build_easy_vqa_train(tmp_path / "train", limit=50, seed=0, max_turns=100)
    entries = json.loads((out / TRAIN_JSON).read_text(encoding="utf-8"))
    in_source_order = 0
    for entry in entries:
        turns = entry["conversations"]
        questions = [turns[0]["value"].removeprefix("<image>\n")] + [turn["value"] for turn in turns[2::2]]
        source_order = list(train_answers[int(Path(entry["image"]).stem)])
        assert sorted(questions) == sorted(source_order)
        in_source_order += questions == source_order
    assert in_source_order < 5


def test_train_folder_is_deterministic_per_seed(tmp_path):
    def json_bytes(name, seed):
        return (build_easy_vqa_train(tmp_path / name, limit=30, seed=seed) / TRAIN_JSON).read_bytes()

    first = json_bytes("a", 0)
    assert json_bytes("b", 0) == first
    assert json_bytes("c", 1) != first


def test_smaller_train_limit_is_a_subset_entry_for_entry(tmp_path):
    def entries(name, limit):
        out = build_easy_vqa_train(tmp_path / name, limit=limit, seed=3)
        return {entry["id"]: entry for entry in json.loads((out / TRAIN_JSON).read_text(encoding="utf-8"))}

    small, large = entries("small", 10), entries("large", 40)
    assert len(small) == 10 and len(large) == 40
    assert all(large[key] == entry for key, entry in small.items())


def test_failed_train_build_leaves_no_folder(tmp_path, monkeypatch):
    copied = []

    def copy_then_fail(source, target):
        copied.append(target)
        if len(copied) == 5:
            raise OSError("disk full")
        Path(target).write_bytes(Path(source).read_bytes())

    monkeypatch.setattr(builders.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_easy_vqa_train(tmp_path / "train", limit=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments", [{"limit": 0}, {"max_turns": 0}])
def test_train_rejects_empty_requests(tmp_path, arguments):
    with pytest.raises(VlaflowError, match="at least 1"):
        build_easy_vqa_train(tmp_path / "train", **arguments)


def test_train_refuses_an_existing_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(VlaflowError, match="already exists"):
        build_easy_vqa_train(tmp_path / "train", limit=1)


# --- multiple-choice benchmark ---


@pytest.fixture(scope="module")
def test_answers():
    return answers_by_image(easy_vqa.get_test_questions())


@pytest.fixture(scope="module")
def image_id_of_base64():
    return {
        base64.b64encode(Path(path).read_bytes()).decode("ascii"): image_id
        for image_id, path in easy_vqa.get_test_image_paths().items()
    }


def check_benchmark(path: Path, letters: str, rows_expected: int, test_answers, image_id_of_base64) -> list[dict]:
    """Every property VLMEvalKit and the scoring rely on; returns the rows."""
    columns, rows = read_tsv(path)
    assert columns == ["index", "image", "question", *letters, "answer", "category", "l2-category", "split"]
    assert len(rows) == rows_expected
    assert [row["index"] for row in rows] == [str(i) for i in range(rows_expected)]

    image_of_row = {}
    for row in rows:
        if len(row["image"]) <= 64:  # VLMEvalKit: the index of the row holding this image
            assert int(row["image"]) < int(row["index"])
            shared = rows[int(row["image"])]["image"]
            assert len(shared) > 64
            image_of_row[row["index"]] = shared
        else:
            image_of_row[row["index"]] = row["image"]
    encoded_images = [row["image"] for row in rows if len(row["image"]) > 64]
    assert len(encoded_images) == len(set(encoded_images)), "each image is stored once"
    for encoded in encoded_images:
        assert decode_png(base64.b64decode(encoded)).size == (64, 64)

    for row in rows:
        image_id = image_id_of_base64[image_of_row[row["index"]]]
        correct = test_answers[image_id][row["question"]]
        category = answer_category(correct)
        group = ANSWER_GROUPS[category]
        filled = [row[letter] for letter in letters if row[letter]]
        assert [row[letter] for letter in letters] == filled + [""] * (len(letters) - len(filled)), (
            "gaps only at the end"
        )
        assert len(filled) == min(len(letters), len(group))
        assert len(set(filled)) == len(filled) and set(filled) <= set(group)
        assert row[row["answer"]] == correct
        assert row["category"] == category
        assert L2_CATEGORIES[row["l2-category"]] == category
        assert row["split"] == "test"
    return rows


def test_benchmark_is_a_vlmevalkit_multiple_choice_tsv(tmp_path, test_answers, image_id_of_base64):
    path = build_easy_vqa_benchmark(tmp_path / "LMUData" / f"{EASY_VQA_BENCHMARK}.tsv", limit=300, seed=0)
    assert path.name == "EasyVQA.tsv"
    rows = check_benchmark(path, "ABCD", 300, test_answers, image_id_of_base64)

    assert {row["category"] for row in rows} == {"shape", "color", "yes/no"}
    assert set(L2_CATEGORIES) == {row["l2-category"] for row in rows}
    assert len({row["answer"] for row in rows}) == 4, "the correct option's letter is shuffled"
    assert any(len(row["image"]) <= 64 for row in rows), "some questions share an image"


def test_benchmark_with_two_options(tmp_path, test_answers, image_id_of_base64):
    path = build_easy_vqa_benchmark(tmp_path / "two.tsv", limit=200, seed=1, options=2)
    rows = check_benchmark(path, "AB", 200, test_answers, image_id_of_base64)
    assert all(row["A"] and row["B"] for row in rows)


def test_full_benchmark_holds_every_test_question(tmp_path, test_answers, image_id_of_base64):
    path = build_easy_vqa_benchmark(tmp_path / "full.tsv")
    check_benchmark(path, "ABCD", len(easy_vqa.get_test_questions()[0]), test_answers, image_id_of_base64)


def test_benchmark_is_deterministic_per_seed(tmp_path):
    def tsv_bytes(name, seed):
        return build_easy_vqa_benchmark(tmp_path / name, limit=100, seed=seed).read_bytes()

    first = tsv_bytes("a.tsv", 0)
    assert tsv_bytes("b.tsv", 0) == first
    assert tsv_bytes("c.tsv", 1) != first


@pytest.mark.parametrize("arguments", [{"options": 1}, {"options": 27}, {"limit": 0}])
def test_benchmark_rejects_impossible_requests(tmp_path, arguments):
    with pytest.raises(VlaflowError):
        build_easy_vqa_benchmark(tmp_path / "b.tsv", **arguments)
    assert list(tmp_path.iterdir()) == []


def test_training_conversations_load_and_collate_through_the_data_pipeline(tmp_path, collator):
    build_easy_vqa_train(tmp_path / "easy_vqa", limit=6, seed=0)
    dataset = VLConversationDataset(tmp_path / "easy_vqa" / TRAIN_JSON, tmp_path / "easy_vqa" / "images")
    assert len(dataset) == 6
    samples = [dataset[index] for index in range(len(dataset))]
    assert all(len(sample.images) == 1 and sample.images[0].size == (64, 64) for sample in samples)
    batch = collator(samples)
    labels = batch["labels"][0]
    answers = [text for role, text in samples[0].turns if role == "assistant"]
    assert collator.tokenizer.decode(labels[labels >= 0]) == "".join(f"{answer}<|im_end|>" for answer in answers)
    # the tiny tokenizer was trained on easy-vqa: each answer word is one token
    assert (labels >= 0).sum() == 2 * len(answers)


def test_a_share_of_training_questions_is_asked_as_the_benchmark_asks(tmp_path, train_answers):
    build_easy_vqa_train(tmp_path / "mixed", limit=30, seed=0, multiple_choice=0.5)
    entries = json.loads((tmp_path / "mixed" / TRAIN_JSON).read_text())
    turns, lettered = 0, 0
    for entry in entries:
        image_id = int(entry["image"].removesuffix(".png"))
        conversation = entry["conversations"]
        for prompt, reply in zip(conversation[::2], conversation[1::2]):
            turns += 1
            text = prompt["value"].removeprefix("<image>\n")
            if "\nOptions:\n" not in text:
                assert train_answers[image_id][text] == reply["value"]
                continue
            lettered += 1
            assert text.endswith("Please select the correct answer from the options above. \n")
            question = text.removeprefix("Question: ").split("\n")[0]
            options = dict(line.split(". ", 1) for line in text.split("Options:\n")[1].splitlines()[:-1])
            assert options[reply["value"]] == train_answers[image_id][question]
            assert {answer_category(option) for option in options.values()} == {answer_category(options["A"])}
    assert 0.3 < lettered / turns < 0.7


def test_images_at_native_sizes_and_text_only_conversations(tmp_path, train_answers):
    sizes = [(48, 64), (480, 640), (768, 1024)]
    build_easy_vqa_train(tmp_path / "varied", limit=40, seed=0, image_sizes=sizes, text_only=0.25)
    entries = json.loads((tmp_path / "varied" / TRAIN_JSON).read_text())
    dataset = VLConversationDataset(tmp_path / "varied" / TRAIN_JSON, tmp_path / "varied" / "images")
    with_image = [index for index, entry in enumerate(entries) if "image" in entry]
    text_only = [entries[index] for index in range(len(entries)) if index not in with_image]
    assert 0.1 < len(text_only) / len(entries) < 0.45
    seen = {dataset[index].images[0].size for index in with_image}
    assert seen == {(width, height) for height, width in sizes}
    assert all(entries[index]["image"].endswith(".jpg") for index in with_image)
    for entry in text_only:
        for prompt, reply in zip(entry["conversations"][::2], entry["conversations"][1::2]):
            word = prompt["value"].removeprefix("Is ").split(" a ")[0]
            assert "<image>" not in prompt["value"] and answer_category(word) == reply["value"]
    for index in with_image[:5]:  # the questions are still about the image
        image_id = int(entries[index]["image"].removesuffix(".jpg"))
        first = entries[index]["conversations"][0]["value"].removeprefix("<image>\n")
        assert first in train_answers[image_id] or "Options:" in first
