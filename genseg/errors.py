"""Exceptions users see. Each message names the file or setting at fault and what is wrong with it."""


class GensegError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class DataError(GensegError):
    """An input file or folder is unreadable, malformed or has unexpected content.

    `problem` names the field and the rule it breaks and never quotes what the file holds, so it is safe to hand
    back to whoever sent the file (the server returns only `problem`). `detail` is optional free text that may
    quote the input or a library's exception (file-chosen names, values): the CLI shows it, the server logs it.
    """

    def __init__(self, path, problem: str, detail: str = ""):
        self.path = str(path)
        self.problem = problem
        self.detail = detail
        super().__init__(f"{self.path}: {self.reason}")

    @property
    def reason(self) -> str:
        """problem plus detail: for the file's owner (CLI output, prepare's bad-file list)."""
        return f"{self.problem} ({self.detail})" if self.detail else self.problem

    def __reduce__(self):  # pickle by its fields so the error survives a trip back from a worker process
        return (type(self), (self.path, self.problem, self.detail))


class ConfigError(GensegError):
    """A config file or option is invalid."""


class CheckpointError(GensegError):
    """A run directory or checkpoint is missing, incomplete or of the wrong kind."""
