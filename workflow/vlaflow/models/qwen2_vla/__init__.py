"""The ChatVLA model on Qwen2-VL, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from vlaflow.models.qwen2_vla.configuration_qwen2_vla import Qwen2VLAConfig
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import (
    ROBOT_EXPERT,
    VL_EXPERT,
    ActionPrediction,
    Qwen2VLAForConditionalGeneration,
    Qwen2VLAOutput,
)
from vlaflow.models.qwen2_vla.processing_qwen2_vla import Qwen2VLAProcessor

AutoConfig.register(Qwen2VLAConfig.model_type, Qwen2VLAConfig, exist_ok=True)
AutoModelForImageTextToText.register(Qwen2VLAConfig, Qwen2VLAForConditionalGeneration, exist_ok=True)
AutoProcessor.register(Qwen2VLAConfig, Qwen2VLAProcessor, exist_ok=True)
# Qwen2-VL checkpoints saved before transformers 5 name the language model `model.layers.*` and
# the vision tower `visual.*`; transformers renames them by class name, so ours needs the entry too.
register_checkpoint_conversion_mapping(
    Qwen2VLAForConditionalGeneration.__name__,
    get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration"),
    overwrite=True,
)

__all__ = [
    "ROBOT_EXPERT",
    "VL_EXPERT",
    "ActionPrediction",
    "Qwen2VLAConfig",
    "Qwen2VLAForConditionalGeneration",
    "Qwen2VLAOutput",
    "Qwen2VLAProcessor",
]
