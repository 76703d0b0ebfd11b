"""The ``forensic-gender`` command. The only place that prints and the only place where
library errors become messages and exit codes (0 ok, 1 some files failed, 2 usage/start-up).

The package's rooms: this module (``main``, logging, and the table of commands), :mod:`.errors`
(the one error wrapper), :mod:`.analyze` (``scan``, ``analyze``, ``check-config``), :mod:`.queries`
(``faces``, ``images``, ``stats``, ``show``, ``review``), :mod:`.exports` (``export``,
``annotate``, ``crops``), :mod:`.persons` (``similar``, ``recluster``, ``persons``,
``evaluate-identity``) and :mod:`.near` (``near``); the service, ``evaluate``, ``models`` and
``serve`` register their commands from their own modules. A command's module is imported only when
that command runs: ``forensic-gender --help`` imports no numpy, onnxruntime, SQLAlchemy or starlette.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from daemon import __version__
from daemon.logs import setup_logging

# Each command: the module that adds it with ``register_cli(subparsers)`` (imported only when the
# command is chosen), the extra of pyproject.toml's [project.optional-dependencies] it needs (None:
# the base install has all it imports), and its help in ``forensic-gender --help``, the words its
# module gives (tests/test_cli_package.py checks that they agree). ``register_cli`` must work
# without the extra (the module imports it lazily); when the extra is missing, the command says
# what to install. A module not present in a checkout is skipped.
PLUGINS: dict[str, tuple[str, str | None, str]] = {
    "scan": ("daemon.cli.analyze", None, "analyse every image under PATHs into the database, then stop"),
    "analyze": ("daemon.cli.analyze", None, "analyse single images and print the faces (no database)"),
    "check-config": ("daemon.cli.analyze", None, "validate a configuration file (for ExecStartPre=)"),
    "models": ("daemon.models", None, "fetch, verify and list the model weights"),
    "evaluate": ("daemon.evaluate", None, "validate the pipeline on labelled folders (images/ + labels.csv) and write a report"),
    "run": ("daemon.service", None, "the service: watch folders, analyse new images, record the results (foreground; systemd Type=notify)"),
    "status": ("daemon.service", None, "files by state, failures, backlog, rate, per root, and whether the service runs"),
    "faces": ("daemon.cli.queries", None, "list faces matching filters (read-only)"),
    "images": ("daemon.cli.queries", None, "list images: paths, hashes, status, face counts (read-only)"),
    "stats": ("daemon.cli.queries", None, "totals, states, failures, gender and age, backlog, throughput, bundles (read-only)"),
    "show": ("daemon.cli.queries", None, "everything known about one image: paths, analyses, faces, reviews, events (read-only)"),
    "export": ("daemon.cli.exports", None, "export the faces of a query as CSV, JSON, JSONL or Project VIC VICS JSON (streamed)"),
    "annotate": ("daemon.cli.exports", None, "draw the stored faces on an image (no re-analysis) into a new file"),
    "crops": ("daemon.cli.exports", None, "write face crops of a query into a folder, named <sha256>_<bundle>_<face>.jpg, with crops.csv"),
    "review": ("daemon.cli.queries", None, "record an analyst's review of a face (stored beside the model output)"),
    "similar": ("daemon.cli.persons", None, "faces in the database like the face in a photo or a stored face, nearest first (read-only)"),
    "recluster": ("daemon.cli.persons", None, "rebuild the persons of all current faces from scratch (keeps the examiner's decisions)"),
    "persons": ("daemon.cli.persons", None, "list persons; name, merge and split them (decisions are audited and survive recluster)"),
    "evaluate-identity": ("daemon.cli.persons", None, "verification and clustering accuracy on identity-labelled faces (e.g. dev lfw)"),
    "near": ("daemon.cli.near", None, "near-copies (resized, recompressed, slightly cropped) of a photo or a recorded image"),
    "serve": ("daemon.web", "web", "serve the local review page (loopback only unless --allow-remote)"),
}
# What each extra that PLUGINS names installs (import names).
EXTRAS: dict[str, tuple[str, ...]] = {"web": ("starlette", "jinja2", "uvicorn")}


def _preflight(args: argparse.Namespace) -> None:
    """Checks before a command starts anything it cannot undo: ``run`` on a SQLite database
    whose file or folder this user cannot write is refused here (a :class:`StoreError` that says
    what to do), before the service creates its lock file beside the database."""
    if args.command == "run":
        from daemon.cliargs import load_config
        from daemon.config import ConfigError
        from daemon.store.engine import require_writable

        try:
            cfg = load_config(args, check_paths=False)
        except ConfigError:
            return  # the service reports every problem of its configuration itself
        require_writable(cfg.database)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forensic-gender", description="Forensic image triage: faces, gender and age.")
    parser.add_argument("--version", action="version", version=f"forensic-gender {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (module, extra, text) in PLUGINS.items():
        if importlib.util.find_spec(module) is None:
            continue
        missing = [m for m in EXTRAS.get(extra or "", ()) if importlib.util.find_spec(m) is None]
        if missing:
            why = f"needs the {extra} extra ({', '.join(missing)} not installed): pip install 'forensic-gender[{extra}]'"
            sub.add_parser(command, help=why)
            sub.choices[command] = _ExtraMissing(command, why)
        else:
            sub.add_parser(command, help=text)
            sub.choices[command] = _Deferred(command, module, parser.prog)
    return parser


class _Deferred(argparse.ArgumentParser):
    """A command whose parser is built when the command is chosen: :meth:`load` imports its
    module and calls the module's ``register_cli``; what follows the command's name is parsed by
    that parser."""

    def __init__(self, command: str, module: str, parent_prog: str) -> None:
        super().__init__(prog=f"{parent_prog} {command}", add_help=False)
        self.command, self.module, self.parent_prog = command, module, parent_prog
        self._parser: argparse.ArgumentParser | None = None

    def load(self) -> argparse.ArgumentParser:
        if self._parser is None:
            probe = argparse.ArgumentParser(prog=self.parent_prog, add_help=False).add_subparsers()
            importlib.import_module(self.module).register_cli(probe)
            parser: Any = probe.choices[self.command]
            self._parser = parser
        return self._parser

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        return self.load().parse_known_args(args, namespace)


class _ExtraMissing(argparse.ArgumentParser):
    """A command whose extra is not installed: what follows its name (``--help`` too) is not
    parsed; the command says which extra to install and exits 2."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(prog=f"forensic-gender {command}", add_help=False)
        self.message = message

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns = namespace if namespace is not None else argparse.Namespace()
        ns.func = self.refuse
        return ns, []

    def refuse(self, args: argparse.Namespace) -> int:
        print(f"{self.prog}: {self.message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from daemon.cli.errors import startup_message

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level or "WARNING" if args.command not in ("run",) else args.log_level or "INFO")
    try:
        _preflight(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("forensic-gender: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = startup_message(err)
        if message is None:
            raise
        print(f"forensic-gender: {message}", file=sys.stderr)
        return 2
