"""Camera frames to model-sized PIL images, and the training augmentation of ChatVLA's diffusion
heads (random crop, rotation, colour jitter), with PIL and numpy only."""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

CROP_SIDE_RATIO = 0.95
MAX_ROTATION_DEGREES = 5.0
BRIGHTNESS, CONTRAST, SATURATION = 0.3, 0.4, 0.5
RESIZE_REDUCING_GAP = 1.0  # Pillow's: shrink by floor(scale / gap) with a box filter before resampling


def _jpeg_bytes(frame) -> bytes | memoryview:
    if isinstance(frame, (bytes, bytearray, np.bytes_)):
        return frame
    if isinstance(frame, np.void):  # an HDF5 opaque element
        return frame.tobytes()
    return memoryview(np.ascontiguousarray(frame, dtype=np.uint8)).cast("B")


def _is_raw_frame(frame) -> bool:
    return isinstance(frame, np.ndarray) and frame.ndim == 3


def decode_frame(frame, size: tuple[int, int] | None = None) -> Image.Image:
    """A frame as an RGB image: `frame` is a raw (H, W, 3) uint8 array or JPEG bytes (ACT's
    zero-padded uint8 row, or a variable-length byte string). With `size` (height, width) the
    image is also resized to it; JPEGs then decode directly at a reduced scale when they can,
    which is several times faster than decoding at full size and shrinking afterwards."""
    if _is_raw_frame(frame):
        image = Image.fromarray(np.asarray(frame, dtype=np.uint8), "RGB")
    else:
        image = Image.open(io.BytesIO(_jpeg_bytes(frame)))  # JPEG ignores the zero padding after its end marker
        if size is not None:
            height, width = size
            image.draft("RGB", (width, height))
        image = image.convert("RGB")
    return image if size is None else resize(image, size)


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    if image.size == (width, height):
        return image
    # Shrinking by a whole factor first (a box filter over each block of pixels) costs a fifth of
    # Pillow's antialiased bilinear filter over the full frame, e.g. 480x640 to 240x320 in 0.5 ms
    # instead of 2.6 ms, and differs from it by a level or two of 255 (tests/benchmarks/robot_loader.py).
    return image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=RESIZE_REDUCING_GAP)


@dataclass(frozen=True)
class Augmentation:
    """One draw of the augmentation; applying it to every camera of a sample gives them the same
    crop, rotation and colour change, as upstream's transform of the stacked cameras does."""

    crop_origin: tuple[float, float]  # (top, left), each in [0, 1): where in the free margin the crop starts
    rotation_degrees: float
    jitter_factors: tuple[tuple[str, float], ...]  # (enhancer, factor) in the order applied

    def apply(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        crop_width, crop_height = int(width * CROP_SIDE_RATIO), int(height * CROP_SIDE_RATIO)
        top = int(self.crop_origin[0] * (height - crop_height + 1))
        left = int(self.crop_origin[1] * (width - crop_width + 1))
        box = (left, top, left + crop_width, top + crop_height)
        image = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
        image = image.rotate(self.rotation_degrees, resample=Image.Resampling.NEAREST)
        for enhancer, factor in self.jitter_factors:
            image = _ENHANCERS[enhancer](image).enhance(factor)
        return image


_ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}
_JITTER_STRENGTHS = {"brightness": BRIGHTNESS, "contrast": CONTRAST, "saturation": SATURATION}


def draw_augmentation(rng: np.random.Generator) -> Augmentation:
    """Crop 95% of each side at a random position (then resize back), rotate within ±5 degrees, and
    jitter brightness, contrast and saturation by factors uniform in [1 - x, 1 + x], in a random
    order as torchvision's ColorJitter does."""
    crop_origin = (float(rng.random()), float(rng.random()))
    rotation = float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    names = list(_JITTER_STRENGTHS)
    factors = {name: float(rng.uniform(1 - strength, 1 + strength)) for name, strength in _JITTER_STRENGTHS.items()}
    order = rng.permutation(len(names))
    return Augmentation(crop_origin, rotation, tuple((names[i], factors[names[i]]) for i in order))
