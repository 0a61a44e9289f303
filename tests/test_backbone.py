"""The download step: the builtin tiny Qwen2-VL, local folders, and the folder check."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2VLForConditionalGeneration,
)

from tests.conftest import random_image
from tests.fake_hub import fake_hub
from vlaflow.backbone.download import BUILTIN_TINY, download, parse_hub_source
from vlaflow.backbone.folder import verify_model_folder
from vlaflow.backbone.tiny import SPECIAL_TOKENS
from vlaflow.cli import main
from vlaflow.data import language
from vlaflow.errors import ModelFolderError, VlaflowError
from vlaflow.models.qwen2_vla import Qwen2VLAProcessor


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_backbone_reloads_offline_through_the_auto_classes(tiny_backbone):
    config = AutoConfig.from_pretrained(tiny_backbone)
    assert config.model_type == "qwen2_vl"
    assert config.vision_config.hidden_size == config.text_config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert AutoImageProcessor.from_pretrained(tiny_backbone).patch_size == config.vision_config.patch_size

    processor = AutoProcessor.from_pretrained(tiny_backbone)
    assert isinstance(processor, Qwen2VLAProcessor)
    model = AutoModelForImageTextToText.from_pretrained(tiny_backbone)
    assert type(model) is Qwen2VLForConditionalGeneration

    inputs = processor.generation_inputs([[random_image(0)]], ["what color is the shape?"])
    image_tokens = (inputs["input_ids"] == config.image_token_id).sum()
    assert image_tokens == inputs["image_grid_thw"].prod() // config.vision_config.spatial_merge_size**2
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_tokenizer_was_trained_on_the_embedded_vocabulary(tiny_backbone):
    from easy_vqa import get_answers

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    for answer in get_answers():  # an answer opens the assistant's turn
        assert len(tokenizer.encode(answer)) == 1, answer
    for word in ("cube", "gripper", "shape", "color", "circle"):  # inside a sentence
        assert len(tokenizer.encode(" " + word)) == 1, word
    instruction = tokenizer.tokenize(language.TRANSFER_CUBE_INSTRUCTION)
    assert len(instruction) <= len(language.TRANSFER_CUBE_INSTRUCTION.split()) + 3


def test_tiny_backbone_is_deterministic_from_its_seed(tiny_backbone, tmp_path):
    again = download(BUILTIN_TINY, tmp_path / "again")
    other_seed = download(BUILTIN_TINY, tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert digest(again / name) == digest(tiny_backbone / name), name
    assert digest(other_seed / "model.safetensors") != digest(tiny_backbone / "model.safetensors")


def test_local_folder_source_is_copied_and_verified(tiny_backbone, tmp_path):
    copy = download(str(tiny_backbone), tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in tiny_backbone.iterdir())
    assert digest(copy / "model.safetensors") == digest(tiny_backbone / "model.safetensors")


def test_download_refuses_to_overwrite_and_leaves_no_partial_output(tiny_backbone, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(VlaflowError, match="already exists"):
        download(BUILTIN_TINY, existing)
    assert (existing / "keep.txt").read_text() == "mine"

    with pytest.raises(VlaflowError, match="not one of"):
        download("/no/such/folder", tmp_path / "out")
    assert list(tmp_path.iterdir()) == [existing]


def test_hub_sources_must_pin_a_revision():
    assert parse_hub_source("hf:Qwen/Qwen2-VL-2B-Instruct@895c3a49") == ("Qwen/Qwen2-VL-2B-Instruct", "895c3a49")
    for source in ("hf:Qwen/Qwen2-VL-2B-Instruct", "hf:Qwen2-VL@main", "hf:@main"):
        with pytest.raises(VlaflowError, match="pin a revision"):
            parse_hub_source(source)


def broken_copy(tiny_backbone, tmp_path, breakage):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_backbone, folder)
    breakage(folder)
    return folder


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            lambda f: (f / "preprocessor_config.json").unlink() or (f / "processor_config.json").unlink(),
            "no image processor",
        ),
        (lambda f: (f / "chat_template.jinja").unlink(), "no chat template"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights"),
        (lambda f: (f / "config.json").write_text('{"model_type": "qwen2_vl",'), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").write_text('{"model_type": "llama"}'), "field 'model_type' is 'llama'"),
        (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
            "model.safetensors: not a readable safetensors file",
        ),
        (
            lambda f: (f / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
            ),
            "model-00002-of-00002.safetensors: missing",
        ),
    ],
    ids=[
        "no-processor",
        "no-chat-template",
        "no-tokenizer",
        "no-weights",
        "bad-json",
        "wrong-type",
        "truncated",
        "lost-shard",
    ],
)
def test_incomplete_or_corrupt_backbone_gives_a_clear_error(tiny_backbone, tmp_path, breakage, message, capsys):
    folder = broken_copy(tiny_backbone, tmp_path, breakage)
    with pytest.raises(ModelFolderError, match=message):
        verify_model_folder(folder)
    assert main(["download", str(folder), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(folder) in error
    assert not (tmp_path / "out").exists()


def test_weights_are_safetensors_only(tiny_backbone):
    assert not list(tiny_backbone.glob("*.bin")) and not list(tiny_backbone.glob("*.pt"))
    state = Qwen2VLForConditionalGeneration.from_pretrained(tiny_backbone).state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in state.values())


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_download(source: str, out, endpoint: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(cache)}
    command = [sys.executable, "-m", "vlaflow.cli", "download", source, str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_hub_branch_is_downloaded_at_the_commit_it_names_which_is_recorded(tiny_backbone, tmp_path):
    with fake_hub("org/tiny", tiny_backbone, COMMIT, branches={"main": COMMIT}) as (endpoint, requests):
        result = hub_download("hf:org/tiny@main", tmp_path / "out", endpoint, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "vlaflow_source.json").read_text())
    assert record == {"source": "hf:org/tiny@main", "repo_id": "org/tiny", "revision": "main", "commit": COMMIT}
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tiny_backbone / "model.safetensors").read_bytes()
    assert "'main' is a branch or tag" in result.stderr and f"model.backbone: hf:org/tiny@{COMMIT}" in result.stderr
    downloads = [request for request in requests if "/resolve/" in request]
    assert downloads and all(f"/resolve/{COMMIT}/" in request for request in downloads)


def test_a_pinned_hub_commit_downloads_quietly_and_a_missing_revision_is_one_line(tiny_backbone, tmp_path):
    with fake_hub("org/tiny", tiny_backbone, COMMIT) as (endpoint, _):
        pinned = hub_download(f"hf:org/tiny@{COMMIT}", tmp_path / "pinned", endpoint, tmp_path / "cache")
        missing = hub_download("hf:org/tiny@no-such-branch", tmp_path / "missing", endpoint, tmp_path / "cache")
    assert pinned.returncode == 0 and "branch or tag" not in pinned.stderr
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith("vlaflow download: error: hub source 'hf:org/tiny@no-such-branch': ")
    )
    assert not (tmp_path / "missing").exists()
