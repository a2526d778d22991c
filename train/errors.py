"""The errors a user can act on. launch.py prints any RunError as one line and exits non-zero:
a traceback means a bug in this code, never a mistake in the config, data, paths or model."""


class RunError(Exception):
    """A mistake or failure the user can fix, described in one line naming the key, file or dir."""


class ConfigError(RunError, ValueError):
    """A configuration mistake: found before anything is loaded or written."""


class DataError(RunError, ValueError):
    """Bad input data: names where (file:line) and what is wrong."""


class CheckpointError(RunError):
    """A checkpoint that cannot be written, read or continued."""


class RunDirError(RunError):
    """The run dir is in use by another process, or is not this trainer's to write into."""


class RunDirInUse(RunDirError):
    """Another live process holds the run dir's lock."""


class TrainingError(RunError):
    """Training went wrong in a way that must stop the run (a non-finite loss or gradient)."""


def first_line(error: BaseException, containing: str = "") -> str:
    """The first non-empty line of an exception's message that holds `containing` (else the first line):
    what a one-line report keeps of a library's multi-line error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if containing in line), lines[0])
