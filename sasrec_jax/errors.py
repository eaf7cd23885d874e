"""Exception types: every user-facing failure is one of these, with a message naming the problem."""


class SasrecError(Exception):
    """Base class for errors the CLI reports as one line (no traceback)."""


class DataError(SasrecError, ValueError):
    """The input interactions are unusable (missing column, NaN ids, empty, ...)."""


class ConfigError(SasrecError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnknownArgumentError(ConfigError, TypeError):
    """An unknown keyword argument (a TypeError, as Python gives for one); the message suggests the closest name."""


class CheckpointError(SasrecError, OSError):
    """A run directory or checkpoint is missing, corrupt, or from an incompatible version."""


class TrainingError(SasrecError, RuntimeError):
    """Training diverged (NaN/Inf loss) or cannot proceed."""


class ResourceError(SasrecError, MemoryError):
    """A step or an evaluation needs more host or device memory than there is."""


class DistributedError(SasrecError, RuntimeError):
    """A multi-process run cannot start, or a process lost contact with the others (a peer died)."""
