"""User-facing errors: one line that names the file, field or tensor and what was expected."""


class PipelineError(Exception):
    """An error caused by input the user gave (a file, a config value, a tensor); the CLI prints it as one line."""


class InputError(PipelineError, ValueError):
    """A tensor or argument of the wrong kind was passed to the public API."""


class ConfigError(PipelineError, ValueError):
    """A configuration value (method name, loss weight, model pairing) is unknown or inconsistent."""


class DataError(PipelineError):
    """A dataset file or folder is missing, unreadable or inconsistent (the message names the file)."""


class CheckpointError(PipelineError):
    """A checkpoint file could not be read or does not fit the model it should initialise."""


class CheckpointWarning(UserWarning):
    """A non-strict checkpoint load skipped or left some tensors uninitialised."""


class ExportError(PipelineError):
    """An artifact could not be produced or failed its check (parity, accuracy); nothing was left behind."""
