"""What went wrong, as the exit status says it: settings, data, or the machinery underneath.

``enrich`` (and the ``ray job submit`` entrypoint, which calls it) exits with

- 0: done;
- 2: usage or configuration: an unknown flag or key, a value of the wrong type or out of range, settings
  that contradict each other or the run dir's completed stages (fix the command or the config file);
- 3: input or run-dir data: a missing or unreadable input, no image in it, a stage whose inputs no
  earlier stage made, a run dir that fails its read-back (fix the data or the run dir);
- 4: infrastructure: Ray could not start or lost its workers, object storage or the disk failed
  (retry, or fix the cluster); a nightly scheduler may retry these, never 2 or 3;
- 1: a defect in enrich_dist itself (a traceback is printed; please report it).
"""

from __future__ import annotations

import errno

EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_DATA, EXIT_INFRA = 0, 1, 2, 3, 4


class ConfigError(ValueError):
    """A setting is wrong: the message names the key (and flag) and what it accepts."""


class InfrastructureError(RuntimeError):
    """Ray, object storage or the disk failed underneath a correct run."""


# OSErrors that say the data is missing or unreadable, not that the machine failed
_DATA_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM}


def exit_code(exc: BaseException) -> int:
    """The exit status for an exception that ended a command (see the module docstring)."""
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, InfrastructureError):
        return EXIT_INFRA
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return EXIT_INFRA
    if isinstance(exc, OSError):
        return EXIT_DATA if exc.errno in _DATA_ERRNOS or isinstance(exc, (FileNotFoundError, PermissionError)) else EXIT_INFRA
    if isinstance(exc, ValueError):  # bad images, tables, run dirs; Ray re-raises a task's ValueError as one
        return EXIT_DATA
    try:
        from ray.exceptions import RayError
    except ImportError:  # pragma: no cover - ray is a dependency
        return EXIT_BUG
    if isinstance(exc, RayError):
        return EXIT_INFRA
    return EXIT_BUG
