"""A VLMEvalKit model, for evaluating a vlaflow checkpoint with VLMEvalKit itself.

Register it in VLMEvalKit's `vlmeval/config.py`:

    from functools import partial
    from vlaflow.evaluation.vlmevalkit import VlaflowVLM

    supported_VLM["vlaflow"] = partial(VlaflowVLM, model_path="results/models/stage2")

then run `python run.py --data MMStar --model vlaflow`. VLMEvalKit builds the prompts (the ones
`vlaflow eval vqa` builds) and scores the answers; the model answers through the same code as
`vlaflow eval vqa`: the vision-language expert, greedy, each image where the message puts it (MMMU's
`<image N>` placeholders interleave them with the text).
"""

from pathlib import Path

from PIL import Image

from vlaflow.evaluation.vqa import answer_messages, load_vl_model

try:
    from vlmeval.vlm.base import BaseModel
except ImportError:  # VLMEvalKit is optional: without it the class still answers messages
    BaseModel = object

DEFAULT_MODEL_PATH = "results/models/stage2"  # where the workflow exports stage 2 (README)


class VlaflowVLM(BaseModel):
    """A vlaflow model folder behind VLMEvalKit's model API."""

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str = DEFAULT_MODEL_PATH, max_new_tokens: int = 16):
        super().__init__()
        self.model, self.processor = load_vl_model(Path(model_path))
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        """Answer one message, a list of `{"type": "image" | "text", "value": path or text}`, its
        parts in their order."""
        parts = [
            Image.open(item["value"]).convert("RGB") if item["type"] == "image" else item["value"] for item in message
        ]
        return answer_messages(self.model, self.processor, [parts], self.max_new_tokens)[0]
