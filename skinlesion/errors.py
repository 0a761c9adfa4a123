"""Errors that mean "the user must change an input or a setting", printed as one line, not a traceback."""


class SkinLesionError(Exception):
    """A problem with user input (data, config, checkpoint) that the message tells how to fix."""


class DataError(SkinLesionError):
    """The dataset on disk is missing, malformed or cannot be split as asked."""


class SplitChangedError(DataError):
    """The data folder no longer gives the split a run was trained and tested on (its split.csv)."""


class ConfigError(SkinLesionError):
    """A setting is invalid or inconsistent with another one."""


class CheckpointError(SkinLesionError):
    """A checkpoint file is missing, corrupt or belongs to another backbone."""


class WeightsError(SkinLesionError):
    """Pretrained weights could not be loaded from the hub or from a local file."""


class TrainingDivergedError(SkinLesionError):
    """The loss became NaN or infinite."""


class SettingError(ConfigError):
    """A setting's value is outside what it allows; found before any work, so nothing was written."""


class FileSystemError(SkinLesionError):
    """A file or folder cannot be written (or read): permissions, a read-only filesystem, no space left."""
