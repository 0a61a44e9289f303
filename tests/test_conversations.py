"""LLaVA / QwenVL conversation files: every format variant, and what makes an entry bad."""

import json

import pytest
from PIL import Image

from tests.data_factory import image_names, vl_entries, write_images
from vlaflow.data.conversations import VLConversationDataset, load_conversations, parse_entry
from vlaflow.errors import VlaflowError


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ({"image": "a.png"}, ("a.png",)),
        ({"images": "a.png"}, ("a.png",)),
        ({"image": ["a.png", "b.png"]}, ("a.png", "b.png")),
        ({"images": ["a.png", "b.png"]}, ("a.png", "b.png")),
    ],
)
def test_image_field_may_be_image_or_images_a_string_or_a_list(images, expected):
    placeholders = "<image>\n" * len(expected)
    conversation = parse_entry({**images, "conversations": [human(placeholders + "q"), gpt("a")]}, "f: entry 0")
    assert conversation.images == expected


@pytest.mark.parametrize("images", [{}, {"image": ""}, {"image": None}, {"images": []}])
def test_no_image_means_a_text_only_sample(images):
    conversation = parse_entry({**images, "conversations": [human("hello"), gpt("hi")]}, "f: entry 0")
    assert conversation.images == ()


def test_multi_turn_with_a_system_turn_keeps_text_and_newlines_exactly():
    turns = [
        {"from": "system", "value": "Be brief."},
        human("<image>\nfirst\n\nline two"),
        gpt("a\nb"),
        human("next?"),
        gpt("c"),
    ]
    conversation = parse_entry({"image": "x.jpg", "conversations": turns}, "f: entry 0")
    assert conversation.turns == (
        ("system", "Be brief."),
        ("user", "<image>\nfirst\n\nline two"),
        ("assistant", "a\nb"),
        ("user", "next?"),
        ("assistant", "c"),
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"image": "a.png", "conversations": [human("no placeholder"), gpt("a")]},
            "conversations: 0 <image> placeholder(s) for 1 image(s)",
        ),
        (
            {"conversations": [human("<image> but no image"), gpt("a")]},
            "conversations: 1 <image> placeholder(s) for 0 image(s)",
        ),
        ({"conversations": []}, "conversations: missing or empty"),
        ({"conversations": [gpt("a"), human("q")]}, "conversations[0].from: expected a human turn"),
        ({"conversations": [human("q"), human("q")]}, "conversations[1].from: expected a gpt turn"),
        ({"conversations": [human("q")]}, "conversations: the last turn has no gpt answer"),
        ({"conversations": [human("q"), {"from": "bot", "value": "a"}]}, "conversations[1].from: 'bot' is not one of"),
        ({"conversations": [human("q"), {"from": "gpt"}]}, "conversations[1].value: missing or not a string"),
        ({"conversations": [human("q"), gpt("<image>")]}, "conversations[1].value: <image> in a gpt turn"),
        ({"image": ["a.png", 3], "conversations": [human("q"), gpt("a")]}, "image: expected a path or a list of paths"),
        ({"image": "a", "images": "b", "conversations": []}, "image: give 'image' or 'images', not both"),
        (["not", "an", "object"], "expected an object with 'conversations'"),
    ],
)
def test_bad_entries_name_the_field(entry, message):
    with pytest.raises(VlaflowError) as error:
        parse_entry(entry, "data.json: entry 3")
    assert str(error.value).startswith("data.json: entry 3: ")
    assert message in str(error.value)


def test_json_and_jsonl_files_give_the_same_conversations(tmp_path):
    entries = vl_entries(8)
    (tmp_path / "a.json").write_text(json.dumps(entries, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(entry) for entry in entries) + "\n\n")
    from_json = [(c.images, c.turns) for c in load_conversations(tmp_path / "a.json")]
    from_jsonl = [(c.images, c.turns) for c in load_conversations(tmp_path / "a.jsonl")]
    assert from_json == from_jsonl and len(from_json) == 8


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"conversations": []}\n{oops\n')
    with pytest.raises(VlaflowError, match="broken.jsonl: line 2: not valid JSON"):
        load_conversations(tmp_path / "broken.jsonl")
    (tmp_path / "object.json").write_text('{"conversations": []}')
    with pytest.raises(VlaflowError, match="object.json: expected a JSON list of conversation entries, got dict"):
        load_conversations(tmp_path / "object.json")
    with pytest.raises(VlaflowError, match="missing.json: annotation file missing"):
        load_conversations(tmp_path / "missing.json")


def test_dataset_samples_open_their_images_in_order(tmp_path):
    entries = vl_entries(4)
    (tmp_path / "a.json").write_text(json.dumps(entries))
    write_images(tmp_path / "images", image_names(entries))
    dataset = VLConversationDataset(tmp_path / "a.json", tmp_path / "images")
    assert [len(dataset[i].images) for i in range(4)] == [1, 2, 1, 0]
    sample = dataset[1]
    assert sample.images[0].mode == "RGB" and sample.images[0].size == (32, 32)
    assert sample.turns == [("user", "<image>\n<image>\nis there a circle?"), ("assistant", "red")]
    assert sample.source == f"{tmp_path / 'a.json'}: entry 1 (id 1)"
    (tmp_path / "images/img/1b.png").unlink()
    with pytest.raises(VlaflowError, match="img/1b.png: image of .*a.json: entry 1 \\(id 1\\): file missing"):
        dataset[1]


def test_dataset_resizes_images_to_the_configured_size(tmp_path):
    entries = vl_entries(4)
    (tmp_path / "a.json").write_text(json.dumps(entries))
    write_images(tmp_path / "images", image_names(entries))
    Image.new("RGB", (640, 480), "red").save(tmp_path / "images/img/0.jpg")  # a photo-sized JPEG
    entries[0]["image"] = "img/0.jpg"
    (tmp_path / "a.json").write_text(json.dumps(entries))
    dataset = VLConversationDataset(tmp_path / "a.json", tmp_path / "images", image_size=(24, 40))
    assert [image.size for index in range(4) for image in dataset[index].images] == [(40, 24)] * 4
    red, green, blue = dataset[0].images[0].getpixel((20, 12))
    assert red > 240 and green < 16 and blue < 16
