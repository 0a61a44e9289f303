"""Vision-language samples from LLaVA / QwenVL conversation files (JSON list or JSONL).

An entry holds `conversations`, a list of `{"from": "human"|"gpt", "value": ...}` turns
(an optional `system` turn first), and its images under `image` or `images`: one path, a list
of paths, or nothing for a text-only sample. Each `<image>` in a human turn marks where an
image goes, in order; their number must equal the number of images.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from vlaflow.data.images import resize
from vlaflow.data.samples import VLSample
from vlaflow.errors import VlaflowError

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    images: tuple[str, ...]  # relative to the dataset's image folder
    turns: tuple[tuple[str, str], ...]  # (role, text) with roles user / assistant / system
    where: str  # "<file>: entry <i>", for messages


def read_annotation(path: Path) -> list:
    """The entries of a JSON list or a JSONL file, with one-line errors for unreadable files."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlaflowError(f"{path}: annotation file missing") from None
    except UnicodeDecodeError as error:
        raise VlaflowError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise VlaflowError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
        return entries
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise VlaflowError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(entries, list):
        raise VlaflowError(f"{path}: expected a JSON list of conversation entries, got {type(entries).__name__}")
    return entries


def parse_entry(entry: object, where: str) -> Conversation:
    if not isinstance(entry, dict):
        raise VlaflowError(f"{where}: expected an object with 'conversations'")
    if "image" in entry and "images" in entry:
        raise VlaflowError(f"{where}: image: give 'image' or 'images', not both")
    image_field = "images" if "images" in entry else "image"
    images = entry.get(image_field) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise VlaflowError(f"{where}: {image_field}: expected a path or a list of paths")
    for image in images:
        if os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == os.pardir:
            raise VlaflowError(f"{where}: {image_field}: {image!r} is not inside the dataset's image folder")

    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise VlaflowError(f"{where}: conversations: missing or empty")
    turns = []
    for number, turn in enumerate(conversations):
        field = f"conversations[{number}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise VlaflowError(f"{where}: {field}.value: missing or not a string")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise VlaflowError(f"{where}: {field}.from: {turn.get('from')!r} is not one of {', '.join(ROLES)}")
        answered = sum(1 for previous, _ in turns if previous != "system")
        expected = "user" if answered % 2 == 0 else "assistant"
        if role == "system" and number != 0:
            raise VlaflowError(f"{where}: {field}.from: a system turn may only come first")
        if role != "system" and role != expected:
            raise VlaflowError(f"{where}: {field}.from: expected a {'human' if expected == 'user' else 'gpt'} turn")
        if role == "assistant" and IMAGE_PLACEHOLDER in turn["value"]:
            raise VlaflowError(f"{where}: {field}.value: {IMAGE_PLACEHOLDER} in a gpt turn")
        if role == "assistant" and not turn["value"].strip():
            raise VlaflowError(f"{where}: {field}.value: an empty gpt answer (nothing to learn from)")
        turns.append((role, turn["value"]))
    if turns[-1][0] != "assistant":
        raise VlaflowError(f"{where}: conversations: the last turn has no gpt answer")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns)
    if placeholders != len(images):
        raise VlaflowError(
            f"{where}: conversations: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)"
        )
    return Conversation(tuple(images), tuple(turns), where)


def load_conversations(annotation: Path) -> list[Conversation]:
    entries = read_annotation(annotation)
    conversations = []
    for index, entry in enumerate(entries):
        identifier = entry.get("id") if isinstance(entry, dict) else None
        where = f"{annotation}: entry {index}" + (f" (id {identifier})" if identifier is not None else "")
        conversations.append(parse_entry(entry, where))
    return conversations


def open_image(path: Path, where: str, size: tuple[int, int] | None = None) -> Image.Image:
    """An image as RGB, decoded now so a broken file fails here, naming the entry it belongs to;
    with `size` (height, width), resized to it (a JPEG decodes at a reduced scale when it can)."""
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("RGB", (size[1], size[0]))
            image = image.convert("RGB")
            return image if size is None else resize(image, size)
    except FileNotFoundError:
        raise VlaflowError(f"{path}: image of {where}: file missing") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise VlaflowError(f"{path}: image of {where}: cannot decode ({error})") from None


class VLConversationDataset(Dataset):
    """The conversations of one annotation file; images are read when a sample is drawn, and
    resized to `image_size` (height, width) when it is given."""

    def __init__(self, annotation: Path, image_root: Path, image_size: tuple[int, int] | None = None):
        self.annotation = Path(annotation)
        self.image_root = Path(image_root)
        self.image_size = image_size
        self.conversations = load_conversations(self.annotation)
        if not self.conversations:
            raise VlaflowError(f"{self.annotation}: no conversation entries")

    def __len__(self) -> int:
        return len(self.conversations)

    def image_paths(self, index: int) -> list[Path]:
        return [self.image_root / image for image in self.conversations[index].images]

    def __getitem__(self, index: int) -> VLSample:
        conversation = self.conversations[index]
        images = [open_image(path, conversation.where, self.image_size) for path in self.image_paths(index)]
        return VLSample(images=images, turns=list(conversation.turns), source=conversation.where)
