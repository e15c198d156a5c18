"""The project's error types.

Every mistake a user can make (a bad option, a malformed file, a workspace from another
run) raises a subclass of ``DeltaloraError`` whose message names the file, field or
option and the way out; the CLI prints it as one line and exits with code 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DeltaloraError(Exception):
    """A user mistake or an unusable input; the message says what and where."""


class ConfigError(DeltaloraError):
    """A config value, preset name or ``--set`` override is invalid; the message names the field."""


class UsageError(DeltaloraError):
    """Command-line options that contradict each other or the files they name."""


class TaskError(DeltaloraError):
    """A task source is malformed or unknown; the message names file, item and field."""


class AdapterError(DeltaloraError):
    """An adapter folder is missing, malformed or does not fit the base model."""


class GeneratorError(DeltaloraError):
    """A generator checkpoint, prompt file or training set cannot be used; the message says why."""


class ArtifactError(DeltaloraError):
    """A file deltalora wrote (manifest, config, results) is missing, unreadable or from another format version."""


class SourceError(DeltaloraError):
    """An offline source (a PyPI distribution, the BIG-bench sdist, a model folder) cannot be found or fetched."""


class OutputError(DeltaloraError):
    """deltalora will not write this path; the message names it and the way out (nothing was changed)."""


def require(cond: bool, msg: str) -> None:
    """Raise ``ConfigError(msg)`` unless ``cond``: the one check every config's ``__post_init__`` makes."""
    if not cond:
        raise ConfigError(msg)
