"""Model definitions; importing this package registers them with transformers' Auto classes."""

from vlaflow.models import qwen2_vla  # noqa: F401
