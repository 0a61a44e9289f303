"""An image-only Qwen2-VL processor, and the one way vlaflow loads a processor.

transformers' `Qwen2VLProcessor` always builds a video processor, which needs torchvision; the
CPU path of vlaflow has no torchvision and never feeds video, so this subclass drops it.
"""

from pathlib import Path

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor


def user_message(text: str, image_count: int = 0) -> dict:
    """A user turn with its images before the text: the shape of every robot prompt, in
    training and at inference."""
    return {"role": "user", "content": [{"type": "image"}] * image_count + [{"type": "text", "text": text}]}


class Qwen2VLAProcessor(Qwen2VLProcessor):
    """Image processor + tokenizer + chat template of Qwen2-VL, without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    def generation_inputs(self, images: list[list], texts: list[str]):
        """Left-padded model inputs for a batch of single-turn user prompts, each with its images
        placed before the text, ending with the assistant's turn."""
        return self.interleaved_inputs(
            [[*sample_images, text] for sample_images, text in zip(images, texts, strict=True)]
        )

    def interleaved_inputs(self, messages: list[list]):
        """Left-padded model inputs for a batch of single-turn user messages, each a list of images
        (PIL) and texts in the order the model sees them, ending with the assistant's turn."""
        prompts, flat_images = [], []
        for message in messages:
            content = [
                {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in message
            ]
            prompts.append(self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
            flat_images += [part for part in message if not isinstance(part, str)]
        return self(text=prompts, images=flat_images or None, padding=True, padding_side="left", return_tensors="pt")


def load_processor(folder: str | Path, **kwargs) -> Qwen2VLAProcessor:
    """The image-only processor of a model folder, whichever processor class its files name.

    `AutoProcessor` follows the folder: the official Qwen2-VL release has no
    `processor_config.json` and its `preprocessor_config.json` names the stock `Qwen2VLProcessor`,
    whose video processor needs torchvision. vlaflow loads every processor through here instead;
    the image processor's settings still come from the folder (`processor_config.json` when it
    nests them, else `preprocessor_config.json`), the tokenizer and chat template likewise."""
    return Qwen2VLAProcessor.from_pretrained(folder, **kwargs)
