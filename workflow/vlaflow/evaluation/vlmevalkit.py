"""A VLMEvalKit model, for evaluating a vlaflow checkpoint with VLMEvalKit itself.

Register it in VLMEvalKit's `vlmeval/config.py`:

    from functools import partial
    from vlaflow.evaluation.vlmevalkit import VlaflowVLM

    supported_VLM["vlaflow"] = partial(VlaflowVLM, model_path="results/stage2")

then run `python run.py --data MMStar --model vlaflow`. VLMEvalKit builds the prompts (the ones
`vlaflow eval vqa` rebuilds) and scores the answers; the model answers through the same code as
`vlaflow eval vqa`: the vision-language expert, greedy, the images before the text.
"""

from pathlib import Path

from PIL import Image

from vlaflow.evaluation.vqa import answer_batch, load_vl_model

try:
    from vlmeval.vlm.base import BaseModel
except ImportError:  # VLMEvalKit is optional: without it the class still answers messages
    BaseModel = object


class VlaflowVLM(BaseModel):
    """A vlaflow model folder behind VLMEvalKit's model API."""

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str = "results/stage2", max_new_tokens: int = 16):
        self.model, self.processor = load_vl_model(Path(model_path))
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        """Answer one message, a list of `{"type": "image" | "text", "value": path or text}`: its
        images in order before its text parts, joined by newlines."""
        images = [Image.open(item["value"]).convert("RGB") for item in message if item["type"] == "image"]
        text = "\n".join(item["value"] for item in message if item["type"] == "text")
        return answer_batch(self.model, self.processor, [images], [text], self.max_new_tokens)[0]
