"""Errors that the command line reports as one line, without a traceback."""


class VlaflowError(Exception):
    """A problem with the user's input (a file, a field, a source), stated so the user can fix it."""


class ConfigError(VlaflowError):
    """A configuration file is unreadable or does not match the schema."""


class ModelFolderError(VlaflowError):
    """A model folder is missing a file, or one of its files is unreadable."""


class MLPWeightsError(VlaflowError):
    """An MLP-weight file does not match the model it should initialise."""
