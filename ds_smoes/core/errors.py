"""User-facing error types shared across ds_smoes.

Every error raised on purpose by the package derives from :class:`SMoESError`,
so a caller can catch one type. Messages say what is wrong *and* how to fix it.
"""


class SMoESError(Exception):
    """Base for user-facing errors: message says what is wrong and how to fix it."""


class ConfigError(SMoESError):
    """A configuration value is missing, malformed or inconsistent with another one."""


class DatasetError(SMoESError):
    """A dataset file, record or image cannot be read or does not follow the expected format."""


class TrainingDiverged(SMoESError):
    """The training loss became NaN or infinite: the run stops without saving the non-finite weights."""


class RunInterrupted(SMoESError):
    """SIGINT / SIGTERM (or a launcher gone) stopped training at a step boundary; the state was saved."""
