"""An image-only Qwen2-VL processor.

transformers' `Qwen2VLProcessor` always builds a video processor, which needs torchvision; the
CPU path of vlaflow has no torchvision and never feeds video, so this subclass drops it.
"""

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor


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
