"""The errors a user can cause and fix: every one derives from :class:`VixmlError`, whose message alone (no
traceback) is what a job prints before exiting with status 2 (:mod:`vixml_ray.cli`). Anything else a job raises is a
bug and keeps its traceback.

Each class also derives from the builtin exception it refines (``ValueError``, ``FileNotFoundError``,
``FileExistsError``), so code catching the builtin keeps working. This module is the package's bottom layer: it
imports nothing from the project.
"""

from __future__ import annotations

from typing import Optional


class VixmlError(Exception):
    """Base of every user error: bad config, bad or missing input, artifacts that do not belong together."""


class ConfigError(VixmlError, ValueError):
    """A configuration file, key or value is invalid; the message names the key (and, for a typo, the closest
    valid one)."""


class InputError(VixmlError, ValueError):
    """A malformed input file or line; the message starts with ``path:line:`` (``path:`` when no line applies)."""

    def __init__(self, path: str, line: Optional[int], message: str):
        self.path, self.line, self.detail = str(path), line, message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple:  # pickled across Ray workers with its own arguments
        return type(self), (self.path, self.line, self.detail)


class MissingPathError(VixmlError, FileNotFoundError):
    """A required file, directory or URI does not exist; the message names it."""

    def __init__(self, path: str, message: Optional[str] = None):
        self.path = str(path)
        text = message or "no such file or directory"
        super().__init__(text if self.path in text else f"{path}: {text}")

    def __str__(self) -> str:  # OSError would format its arguments as a tuple
        return str(self.args[0])

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.args[0])


class OutputExistsError(VixmlError, FileExistsError):
    """A job's output already exists and was not to be replaced (``--overwrite`` replaces it)."""

    def __init__(self, path: str, message: Optional[str] = None):
        self.path = str(path)
        super().__init__(message or f"output already exists: {path} (remove it or pass --overwrite)")

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.args[0])


class IncompatibleArtifactError(VixmlError, ValueError):
    """An export, index version, feature cache or dataset that do not belong together (another model or label
    catalogue, other dimensions) or lack a part another needs; the message names both and the fix."""
