"""vlaflow: train vision-language-action models that keep their vision-language understanding."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlaflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
