"""Exceptions users see. Each message names the file or setting at fault and what is wrong with it."""


class GensegError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class DataError(GensegError):
    """An input file or folder is unreadable, malformed or has unexpected content."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # pickle by (path, problem) so the error survives a trip back from a worker process
        return (type(self), (self.path, self.problem))


class ConfigError(GensegError):
    """A config file or option is invalid."""


class CheckpointError(GensegError):
    """A run directory or checkpoint is missing, incomplete or of the wrong kind."""
