"""User-facing errors: the CLI prints their message (no traceback) and exits 2."""


class ArpgError(Exception):
    """A failure the user can fix: the message names the thing and the fix."""


class ConfigError(ArpgError):
    """A params file that is missing, unreadable or fails the schema."""


class CheckpointError(ArpgError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


class DataError(ArpgError):
    """A data source or prepared artifact that is missing or unusable."""


class TrainingDiverged(ArpgError):
    """A training loss that became NaN or infinite: the stage stops, the last good checkpoint stays."""
