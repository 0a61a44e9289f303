"""`builtin:tiny-qwen2-vl`: a real transformers Qwen2-VL, small enough to train on a laptop CPU.

Everything is built offline and deterministically from a seed: a byte-level BPE tokenizer trained
with `tokenizers` on the text the embedded default feeds the model, Qwen2-VL's special tokens and
chat template, a PIL image processor, the image-only processor, and randomly initialised weights.

`builtin:tiny-qwen2-vl-release` is the same model shaped like the official
`Qwen/Qwen2-VL-2B-Instruct` folder on the hub: the release's file set and JSON keys
(transformers-4.41 `config.json`, `preprocessor_config.json` naming the stock `Qwen2VLProcessor`,
no `processor_config.json`, `chat_template.json`, `vocab.json` + `merges.txt` + `tokenizer.json`,
its 14 special tokens), bf16 weights in two shards with an index, named `model.layers.*` /
`visual.*`, `lm_head` tied to the embeddings and absent from the files. The rehearsal of the
published recipe runs on it, so every path the hub folder takes is exercised without the hub.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlaflow.data import language
from vlaflow.models.qwen2_vla.processing_qwen2_vla import Qwen2VLAProcessor

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The official release's special tokens, in its id order, right after the BPE vocabulary.
RELEASE_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_VOCAB_SIZE = 1024

# 2 decoder layers of width 64 (4 heads of 16: mrope sections sum to 8), a 2-block vision tower
# with 8-pixel patches so a 64x64 image becomes 16 merged image tokens.
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    rope_theta=10000.0,
)
VISION_CONFIG = dict(
    depth=2,
    embed_dim=64,
    hidden_size=64,
    num_heads=4,
    mlp_ratio=2,
    patch_size=8,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
IMAGE_MIN_PIXELS = 16 * 16
IMAGE_MAX_PIXELS = 128 * 128


def tokenizer_corpus() -> list[str]:
    """The text the embedded default trains and evaluates on, one string per line."""
    from easy_vqa import get_answers, get_test_questions, get_train_questions

    lines = [language.SYSTEM_PROMPT, language.TRANSFER_CUBE_INSTRUCTION, language.NEXT_ACTION_MARKER]
    lines += language.TRANSFER_CUBE_REASONING.values()
    lines += [
        "Question:",
        "Options:",
        "Hint:",
        language.MULTIPLE_CHOICE_INSTRUCTION,
        "Answer with the option's letter from the given choices directly.",
        *(f"{letter}. " for letter in "ABCDEFGHIJ"),
        "system user assistant",
    ]
    for questions, answers, _ in (get_train_questions(), get_test_questions()):
        lines += questions
        lines += answers
    answer_words = get_answers()
    lines += answer_words + [word.capitalize() for word in answer_words]
    return lines


def train_bpe(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer, trained on `corpus`."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe


def train_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Qwen2Tokenizer:
    """`train_bpe`'s vocabulary wrapped as transformers' Qwen2Tokenizer."""
    trained = json.loads(train_bpe(corpus, vocab_size).to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=2048,
    )
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer, tie_word_embeddings: bool = False) -> Qwen2VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    text_config = dict(
        TEXT_CONFIG,
        vocab_size=vocab_size,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen2VLForConditionalGeneration"],
    )


def build_model(config: Qwen2VLConfig, seed: int) -> Qwen2VLForConditionalGeneration:
    """The tiny model with randomly initialised weights, the same for the same seed."""
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def build_tiny_qwen2_vl(out: Path, seed: int = 0) -> None:
    """Write a complete tiny Qwen2-VL folder (weights, tokenizer, processor, chat template) to `out`."""
    tokenizer = train_tokenizer(tokenizer_corpus())
    config = build_config(tokenizer)
    model = build_model(config, seed)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=VISION_CONFIG["patch_size"],
        merge_size=VISION_CONFIG["spatial_merge_size"],
        temporal_patch_size=VISION_CONFIG["temporal_patch_size"],
        size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
    )
    processor = Qwen2VLAProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    # Tools written for transformers 4 (and the official Qwen2-VL folders) read preprocessor_config.json.
    image_processor.save_pretrained(out)


# --- builtin:tiny-qwen2-vl-release: the same model in the official hub folder's shape ---

RELEASE_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
RELEASE_INDEX = "model.safetensors.index.json"
# The release's min_pixels 3136 (56 x 56) and max_pixels 12845056 are 16 and 65536 patches of 14 x 14
# pixels; the tiny's patches are 8 x 8, so the same patch counts are (8/14)^2 as many pixels.
RELEASE_MIN_PIXELS = 16 * VISION_CONFIG["patch_size"] ** 2  # 1024
RELEASE_MAX_PIXELS = 65536 * VISION_CONFIG["patch_size"] ** 2  # 4194304
# transformers 5 names the modules `model.language_model.*` and `model.visual.*`; the release (saved
# with transformers 4) names the weights `model.*` and `visual.*`.
RELEASE_WEIGHT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_release_tokenizer(out: Path, corpus: list[str]) -> dict[str, int]:
    """`train_bpe`'s vocabulary as the release writes a tokenizer: vocab.json, merges.txt,
    tokenizer.json with the 14 special tokens after the vocabulary, and tokenizer_config.json in the
    transformers-4 layout. Returns the special tokens' ids."""
    bpe = train_bpe(corpus)
    trained = json.loads(bpe.to_str())["model"]
    _write_json(out / "vocab.json", trained["vocab"])
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in trained["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges), encoding="utf-8")
    bpe.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in RELEASE_SPECIAL_TOKENS])
    (out / "tokenizer.json").write_text(bpe.to_str(pretty=True) + "\n", encoding="utf-8")
    ids = {token: bpe.token_to_id(token) for token in RELEASE_SPECIAL_TOKENS}
    if list(ids.values()) != list(range(len(trained["vocab"]), len(trained["vocab"]) + len(ids))):
        raise RuntimeError(f"special tokens not numbered right after the vocabulary: {ids}")
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(ids[token]): {"content": token, **flags} for token in RELEASE_SPECIAL_TOKENS},
            "additional_special_tokens": list(RELEASE_SPECIAL_TOKENS[1:]),
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    return ids


def release_config_dict(config: Qwen2VLConfig) -> dict:
    """`config` in the release's transformers-4.41 layout: text fields at the top level,
    `rope_scaling` of type mrope, the vision tower's fields under their old names."""
    text, vision = config.text_config, config.vision_config
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": text.attention_dropout,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": config.vision_token_id,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": text.initializer_range,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,  # the release: every layer (no sliding window)
        "model_type": "qwen2_vl",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "sliding_window": text.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": text.use_cache,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision.depth,
            "embed_dim": vision.embed_dim,
            "mlp_ratio": vision.mlp_ratio,
            "num_heads": vision.num_heads,
            "in_chans": vision.in_channels,
            "hidden_size": vision.hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "spatial_patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(text.rope_parameters["mrope_section"])},
        "vocab_size": text.vocab_size,
    }


def release_state_dict(model: Qwen2VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights in bf16 under the release's names; the tied `lm_head.weight` is left out."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for current, released in RELEASE_WEIGHT_PREFIXES:
            if name.startswith(current):
                name = released + name.removeprefix(current)
                break
        tensors[name] = tensor.detach().to(torch.bfloat16).contiguous()
    return tensors


def write_release_weights(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards (names in sorted order, split near half the bytes) and their index."""
    names = sorted(tensors)
    total = sum(tensors[name].nbytes for name in names)
    first, size = [], 0
    for name in names[:-1]:
        if first and size + tensors[name].nbytes > total / 2:
            break
        first.append(name)
        size += tensors[name].nbytes
    shard_of = {name: RELEASE_SHARDS[0] if name in first else RELEASE_SHARDS[1] for name in names}
    for shard in RELEASE_SHARDS:
        save_file({name: tensors[name] for name in names if shard_of[name] == shard}, out / shard, {"format": "pt"})
    _write_json(out / RELEASE_INDEX, {"metadata": {"total_size": total}, "weight_map": shard_of})


def build_tiny_qwen2_vl_release(out: Path, seed: int = 0) -> None:
    """Write the tiny Qwen2-VL to `out` in the file layout of the official Qwen2-VL-2B-Instruct release."""
    from transformers import AutoTokenizer

    out = Path(out)
    ids = write_release_tokenizer(out, tokenizer_corpus())
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = build_config(tokenizer, tie_word_embeddings=True)
    write_release_weights(out, release_state_dict(build_model(config, seed)))
    _write_json(out / "config.json", release_config_dict(config))
    endoftext, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": endoftext,
            "pad_token_id": endoftext,
            "do_sample": True,
            "eos_token_id": [im_end, endoftext],
            "repetition_penalty": 1.0,
            "temperature": 0.01,
            "top_p": 0.001,
            "top_k": 1,
            "transformers_version": "4.37.0",
        },
    )
    _write_json(
        out / "preprocessor_config.json",
        {
            "min_pixels": RELEASE_MIN_PIXELS,
            "max_pixels": RELEASE_MAX_PIXELS,
            "patch_size": VISION_CONFIG["patch_size"],
            "temporal_patch_size": VISION_CONFIG["temporal_patch_size"],
            "merge_size": VISION_CONFIG["spatial_merge_size"],
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
