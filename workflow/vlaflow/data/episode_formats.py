"""The robot episode formats a registry entry can name with `format:`; a new format is one entry
here and one `EpisodeFormat` subclass (see `episodes.py`)."""

from vlaflow.data.episodes import EpisodeFormat
from vlaflow.data.hdf5_episodes import Hdf5Format
from vlaflow.data.lerobot_episodes import LeRobotFormat

EPISODE_FORMATS: dict[str, type[EpisodeFormat]] = {
    Hdf5Format.name: Hdf5Format,
    LeRobotFormat.name: LeRobotFormat,
}
DEFAULT_FORMAT = Hdf5Format.name
