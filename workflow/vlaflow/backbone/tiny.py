"""`builtin:tiny-qwen2-vl`: a real transformers Qwen2-VL, small enough to train on a laptop CPU.

Everything is built offline and deterministically from a seed: a byte-level BPE tokenizer trained
with `tokenizers` on the text the embedded default feeds the model, Qwen2-VL's special tokens and
chat template, a PIL image processor, the image-only processor, and randomly initialised weights.
"""

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
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


def train_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer, wrapped as transformers' Qwen2Tokenizer."""
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
    trained = json.loads(bpe.to_str())["model"]
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


def build_config(tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
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
        tie_word_embeddings=False,
        architectures=["Qwen2VLForConditionalGeneration"],
    )


def build_tiny_qwen2_vl(out: Path, seed: int = 0) -> None:
    """Write a complete tiny Qwen2-VL folder (weights, tokenizer, processor, chat template) to `out`."""
    tokenizer = train_tokenizer(tokenizer_corpus())
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
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
