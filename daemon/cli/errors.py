"""The CLI's error edge, the one place where library errors become messages and exit codes.

:func:`guarded` wraps every command: an error the user can act on becomes one line
``forensic-gender COMMAND: <message>`` on standard error (control characters escaped) and an exit
code (2 usage or input, 1 not found); a closed standard output (``| head``) ends the command
quietly with 0. :func:`startup_message` words the start-up errors that ``main`` reports as
``forensic-gender: <message>`` with exit code 2.

The library errors are named by module and class and looked up among the modules already
imported: an error whose module was never imported cannot have been raised, so the wrapper imports
nothing (``forensic-gender --help`` and light commands stay light).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from daemon.paths import show

Command = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A problem to report as one line and exit with ``code`` (2 usage or input, 1 not found)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# (module, class, exit code, where the message is: "problems" a list, "message" an attribute, "" str(err))
COMMAND_ERRORS: tuple[tuple[str, str, int, str], ...] = (
    ("daemon.queries.filters", "FilterError", 2, "problems"),
    ("daemon.queries.output", "OutputError", 2, "message"),
    ("daemon.queries.media", "MediaError", 1, "message"),
    ("daemon.store.reviews", "ReviewError", 2, ""),
    ("daemon.store.persons", "PersonError", 2, ""),
    ("daemon.queries.similar", "SimilarError", 2, ""),
    ("daemon.identity_eval", "IdentityEvalError", 2, ""),
    ("daemon.pipeline.images", "ImageError", 2, ""),
)
# (module, class, what goes before the message)
STARTUP_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("daemon.config", "ConfigError", ""),
    ("daemon.models.manifest", "ModelError", "model problem: "),
    ("daemon.pipeline.sessions", "ModelLoadError", "model problem: "),
    ("daemon.workers", "WorkerStartError", "the analysis workers could not start: "),
    ("daemon.store.engine", "StoreError", ""),
)


def _is(err: BaseException, module: str, name: str) -> bool:
    """Whether ``err`` is a ``module.name``, without importing ``module``."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(err, cls)


def _say(command: str, lines: list[str], code: int) -> int:
    for line in lines:
        print(f"forensic-gender {command}: {show(line)}", file=sys.stderr)
    return code


def guarded(cmd: Command) -> Command:
    """``cmd`` with the errors of :data:`COMMAND_ERRORS` and :class:`CliError` reported as the
    module docstring says; any other error goes on to ``main``."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except CliError as err:
            return _say(args.command, [str(err)], err.code)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except Exception as err:
            for module, name, code, where in COMMAND_ERRORS:
                if _is(err, module, name):
                    found = getattr(err, where) if where else str(err)
                    return _say(args.command, list(found) if where == "problems" else [found], code)
            raise

    return run


def startup_message(err: BaseException) -> str | None:
    """The message for a start-up error of :data:`STARTUP_ERRORS`, else None."""
    for module, name, prefix in STARTUP_ERRORS:
        if _is(err, module, name):
            return f"{prefix}{err}"
    return None
